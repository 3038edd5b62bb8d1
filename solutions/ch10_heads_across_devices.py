"""Chapter 10: heads across devices, Megatron-style tensor parallelism of multi-head attention (PyTorch)."""

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def shard_heads(state_dict: dict, rank: int, world_size: int, num_heads: int) -> dict:
    """The part of a multi-head attention layer's weights that rank ``rank`` of ``world_size`` holds.

    ``state_dict`` is the state dict of ``nn.MultiheadAttention(E, H, batch_first=True)`` (or
    chapter 4's ``MultiHeadAttention``): ``in_proj_weight`` (3E, E) = [W_q; W_k; W_v],
    ``in_proj_bias`` (3E), ``out_proj.weight`` (E, E), ``out_proj.bias`` (E); the two biases
    are absent when the layer has none. With H = num_heads, p = world_size, D = E // H and
    h = H // p heads per rank, rank r holds the contiguous block of heads r*h .. (r+1)*h - 1:

    - ``in_proj_weight`` (3E/p, E): the rows of those heads in W_q, then in W_k, then in W_v
      (rows r*h*D .. (r+1)*h*D - 1 of each of the three E x E blocks; not one contiguous
      slice of the packed matrix), so the shard is itself a packed projection for h heads;
    - ``in_proj_bias`` (3E/p): the matching entries, in the same order;
    - ``out_proj.weight`` (E, E/p): the matching *columns* of the output projection;
    - ``out_proj.bias`` (E): the whole bias, on every rank (the layer adds it once, after the
      all-reduce).

    The returned tensors keep the input's dtype and device. Raises ValueError when E is not
    divisible by H, when H is not divisible by p, or when rank is not in 0 .. p - 1.
    """
    ### BEGIN SOLUTION
    weight = state_dict["in_proj_weight"]
    embed_dim = weight.shape[1]
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if num_heads % world_size != 0:
        raise ValueError(f"num_heads {num_heads} is not divisible by world_size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0 .. {world_size - 1}")
    head_dim = embed_dim // num_heads
    width = (num_heads // world_size) * head_dim  # features of this rank's heads in each of Q, K, V
    cols = slice(rank * width, (rank + 1) * width)
    shard = {"in_proj_weight": torch.cat([w[cols] for w in weight.chunk(3)]).clone()}
    if state_dict.get("in_proj_bias") is not None:
        shard["in_proj_bias"] = torch.cat([b[cols] for b in state_dict["in_proj_bias"].chunk(3)]).clone()
    shard["out_proj.weight"] = state_dict["out_proj.weight"][:, cols].clone()
    if state_dict.get("out_proj.bias") is not None:
        shard["out_proj.bias"] = state_dict["out_proj.bias"].clone()
    return shard
    ### END SOLUTION


class TensorParallelMultiHeadAttention(nn.Module):
    """One rank's part of a multi-head attention layer whose heads are split across the ranks of ``group``.

    ``group`` is a process group (None = the default group, every rank of the world); this rank's
    place in it, r = ``dist.get_rank(group)``, and its size, p = ``dist.get_world_size(group)``,
    decide which heads it holds. Parameters (load them with
    ``load_state_dict(shard_heads(full_state_dict, r, p, H))``): ``in_proj_weight`` (3E/p, E) = the
    rank's rows of [W_q; W_k; W_v], ``in_proj_bias`` (3E/p), and ``out_proj``, an
    ``nn.Linear(E/p, E)`` holding the rank's columns of the output projection and the whole output
    bias; no biases when ``bias=False``. The constructor does not communicate. Raises ValueError
    when E % H or H % p is not 0.

    ``forward`` must be called on every rank of ``group`` with the same inputs; every rank returns
    the same (B, L, E) output, equal to the single-device layer's, and after ``backward`` of the
    same loss on every rank, every rank holds the single-device gradients: of the inputs in full,
    and of its own slices of the weights and biases (of the whole output bias).

    The two autograd functions below are Megatron-LM's conjugate pair. ``CopyToRanks`` (f) stands
    at the layer's input: the identity forward, an all-reduce (sum) of the gradient backward.
    ``SumOverRanks`` (g) stands at its output: an all-reduce of the partial outputs forward, the
    identity backward.
    """

    class CopyToRanks(torch.autograd.Function):
        """f: identity forward; backward, the sum over the ranks of the input's gradient."""

        @staticmethod
        def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
            ### BEGIN SOLUTION
            ctx.group = group
            return x.view_as(x)
            ### END SOLUTION

        @staticmethod
        def backward(ctx, grad: torch.Tensor):
            ### BEGIN SOLUTION
            grad = grad.contiguous().clone()  # all-reduce a copy: autograd may reuse the incoming gradient
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return grad, None
            ### END SOLUTION

    class SumOverRanks(torch.autograd.Function):
        """g: forward, the sum over the ranks of the partial outputs; identity backward."""

        @staticmethod
        def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
            ### BEGIN SOLUTION
            total = partial.contiguous().clone()  # leave the input alone: all_reduce writes in place
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            return total
            ### END SOLUTION

        @staticmethod
        def backward(ctx, grad: torch.Tensor):
            ### BEGIN SOLUTION
            return grad, None
            ### END SOLUTION

    def __init__(self, embed_dim: int, num_heads: int, group=None, bias: bool = True):
        super().__init__()
        ### BEGIN SOLUTION
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)  # local queries: no communication
        if rank < 0:
            raise ValueError("this process is not a member of the group")
        if num_heads % world_size != 0:
            raise ValueError(f"num_heads {num_heads} is not divisible by the group's {world_size} ranks")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.local_heads = num_heads // world_size
        self.head_dim = embed_dim // num_heads
        width = self.local_heads * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, embed_dim))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(width, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        ### END SOLUTION

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """query (B, L, E); key and value (B, S, E) (key defaults to query, value to key) -> (B, L, E).

        Masks as in chapter 4 and ``nn.MultiheadAttention``: a bool mask marks with True what may
        NOT be attended to, a float mask is added to the scores; ``key_padding_mask`` is (B, S),
        ``attn_mask`` is (L, S). ``is_causal=True`` with no ``attn_mask`` lets query i see keys
        j <= i. A query whose keys are all masked gets zero weights. Each input passes through f
        (``CopyToRanks``) once; each rank attends with its own heads and projects them with its
        columns of the output projection; g (``SumOverRanks``) sums the partial outputs over the
        ranks, and the output bias is added once, after the sum.
        """
        ### BEGIN SOLUTION
        key = query if key is None else key
        value = key if value is None else value
        # f once per distinct input tensor (self-attention passes one tensor three times): its gradient
        # is then the sum of the three paths on this rank, all-reduced once over the ranks.
        copied: dict[int, torch.Tensor] = {}
        for t in (query, key, value):
            if id(t) not in copied:
                copied[id(t)] = self.CopyToRanks.apply(t, self.group)
        query, key, value = copied[id(query)], copied[id(key)], copied[id(value)]
        batch, tgt_len, _ = query.shape
        src_len = key.shape[1]
        heads, head_dim = self.local_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, T, h*D) -> (B, h, T, D)
            return x.reshape(batch, x.shape[1], heads, head_dim).transpose(1, 2)

        q = split(F.linear(query, w_q, b_q))
        k = split(F.linear(key, w_k, b_k))
        v = split(F.linear(value, w_v, b_v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)  # (B, h, L, S)

        def additive(mask: torch.Tensor) -> torch.Tensor:
            if mask.dtype == torch.bool:  # True = not allowed -> -inf
                return torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(mask, float("-inf"))
            return mask.to(scores.dtype)

        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            scores = scores + additive(attn_mask)
        if key_padding_mask is not None:
            scores = scores + additive(key_padding_mask).view(batch, 1, 1, src_len)
        all_masked = scores.amax(dim=-1, keepdim=True) == float("-inf")
        weights = torch.softmax(scores.masked_fill(all_masked, 0.0), dim=-1).masked_fill(all_masked, 0.0)
        heads_out = (weights @ v).transpose(1, 2).reshape(batch, tgt_len, heads * head_dim)
        partial = F.linear(heads_out, self.out_proj.weight)  # this rank's share of the output, no bias
        out = self.SumOverRanks.apply(partial, self.group)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias  # once, after the sum
        return out
        ### END SOLUTION
