"""``python -m autograder <verb>``: sync, release, check, book, grade and export."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autograder.checks.seeding import DEFAULT_COURSE_SEED
from autograder.course import ROOT, find_chapter


def _sync(args: argparse.Namespace) -> int:
    from autograder.sync import sync

    drifted = sync(check=args.check)
    if args.check:
        if drifted:
            print("These notebooks differ from what sync writes (run `python -m autograder sync`):", file=sys.stderr)
            for name in drifted:
                print(f"  {name}", file=sys.stderr)
            return 1
        print("chapters/ match solutions/, and student/ matches chapters/.")
        return 0
    print("Rewrote: " + ", ".join(drifted) if drifted else "chapters/ and student/ already up to date.")
    return 0


def _release(args: argparse.Namespace) -> int:
    from autograder.release import release

    out = release(Path(args.out).resolve())
    print(f"Course directory ready: {out}/source (instructor) and {out}/release (students).")
    return 0


def _check(args: argparse.Namespace) -> int:
    from autograder.check import CannotGrade, check

    try:
        report = check(
            Path(args.notebook),
            chapter=args.chapter,
            cell_timeout=args.timeout,
            student=args.student,
            hidden_seed=args.hidden_seed,
            sandbox=False if args.no_sandbox else None,
        )
    except CannotGrade as exc:
        print(f"cannot grade: {exc}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.table())
    return 0


def _book(args: argparse.Namespace) -> int:
    from autograder.book import build_book

    return build_book(jobs=args.jobs)


def _grade(args: argparse.Namespace) -> int:
    from autograder.grade import main as grade_main

    return grade_main(args)


def _export(args: argparse.Namespace) -> int:
    from autograder.grading import exports

    needs_source = args.format in ("gradescope", "gradescope-results", "canvas")
    if needs_source and not args.source:
        print(
            f"export {args.format}: give the {'check JSON' if 'results' in args.format else 'course directory'}", file=sys.stderr
        )
        return 2
    if args.format in ("gradescope-bundle", "gradescope-results") and not args.chapter:
        print(f"export {args.format}: --chapter is required", file=sys.stderr)
        return 2
    try:
        if args.format == "gradescope":
            out = Path(args.out or Path(args.source) / "gradescope")
            written = exports.export_gradescope(Path(args.source), out, args.hidden_visibility)
            print(f"{len(written)} results.json files under {out}")
        elif args.format == "gradescope-results":
            text = Path(args.source).read_text() if Path(args.source).exists() else ""
            err = Path(args.stderr).read_text() if args.stderr and Path(args.stderr).exists() else ""
            body = json.dumps(exports.gradescope_from_check(text, args.chapter, err), indent=1) + "\n"
            if args.out:
                Path(args.out).write_text(body)
            else:
                sys.stdout.write(body)
        elif args.format == "gradescope-bundle":
            out = exports.gradescope_bundle(args.chapter, Path(args.out or f"autograder-{find_chapter(args.chapter).slug}.zip"))
            print(f"Gradescope autograder: {out} (upload it as the assignment's autograder zip)")
        else:
            roster = Path(args.roster) if args.roster else None
            text = exports.canvas_csv(Path(args.source), roster, args.match)
            out = Path(args.out or Path(args.source) / "canvas.csv")
            out.write_text(text)
            print(f"Canvas gradebook: {out}")
            for sid in exports.unmatched(Path(args.source), roster, args.match) if roster else []:
                print(f"not in the roster, left out: {sid}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"cannot export: {exc}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autograder", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("sync", help="regenerate exercise cells in chapters/ from solutions/, and the student copies in student/")
    s.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    s.set_defaults(func=_sync)

    s = sub.add_parser("release", help="build an nbgrader course directory (source/ and release/)")
    s.add_argument("--out", default=str(ROOT / "_build" / "course"), help="course directory (default: _build/course)")
    s.set_defaults(func=_release)

    s = sub.add_parser("check", help="grade one notebook with nbgrader and print the results")
    s.add_argument("notebook")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--chapter", help="the chapter (slug or number), when the notebook was renamed")
    s.add_argument("--timeout", type=int, default=60, help="seconds per cell (default 60)")
    s.add_argument(
        "--student", default="student", help="student id whose hidden inputs to draw (as `grade` does; default 'student')"
    )
    s.add_argument(
        "--hidden-seed", default=DEFAULT_COURSE_SEED, help="course-wide seed of the hidden inputs (as `grade --hidden-seed`)"
    )
    s.add_argument("--no-sandbox", action="store_true", help="do not use bubblewrap even where it is installed")
    s.set_defaults(func=_check)

    s = sub.add_parser("book", help="execute the chapters, stage skeletons with outputs, build the HTML book")
    s.add_argument("--jobs", type=int, default=2, help="notebooks executed in parallel (default 2)")
    s.set_defaults(func=_book)

    s = sub.add_parser("grade", help="autograde a class: sandboxed, parallel, resumable; feedback pages and a grades CSV")
    from autograder.grade import add_arguments as _grade_arguments

    _grade_arguments(s)
    s.set_defaults(func=_grade)

    s = sub.add_parser(
        "export",
        help="grades for Gradescope (results.json, an autograder zip) or Canvas (a gradebook CSV)",
        description="gradescope COURSE: results.json per graded submission; gradescope-results CHECK_JSON: results.json "
        "from `check --json` output (the bundle's run_autograder uses it); gradescope-bundle --chapter CH: the "
        "autograder zip of a Gradescope assignment; canvas COURSE: a gradebook CSV for Canvas (Grades > Import)",
    )
    s.add_argument("format", choices=["gradescope", "gradescope-results", "gradescope-bundle", "canvas"])
    s.add_argument("source", nargs="?", help="the course directory `grade --out` wrote, or (gradescope-results) the check JSON")
    s.add_argument("--out", help="where to write (a folder for gradescope, a file otherwise; see the defaults in the docs)")
    s.add_argument("--chapter", help="gradescope-bundle, gradescope-results: the chapter (slug or number)")
    s.add_argument("--stderr", help="gradescope-results: the file `check` wrote its messages to (the reason it could not grade)")
    s.add_argument(
        "--hidden-visibility",
        default="visible",
        choices=["visible", "hidden", "after_due_date", "after_published"],
        help="gradescope: when students see the hidden tests' results (default visible, as on the feedback pages)",
    )
    s.add_argument("--roster", help="canvas: a CSV exported from Canvas's gradebook; keep its students, ids and sections")
    s.add_argument(
        "--match", default="SIS User ID", help="canvas: the roster column holding grade's student ids (default 'SIS User ID')"
    )
    s.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)
