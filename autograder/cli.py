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

    try:
        if args.format == "gradescope":
            out = Path(args.out or Path(args.course) / "gradescope")
            written = exports.export_gradescope(Path(args.course), out, args.hidden_visibility)
            print(f"{len(written)} results.json files under {out}")
        elif args.format == "gradescope-results":
            text = Path(args.check_json).read_text() if Path(args.check_json).exists() else ""
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
            text = exports.canvas_csv(Path(args.course), roster, args.match)
            out = Path(args.out or Path(args.course) / "canvas.csv")
            out.write_text(text)
            print(f"Canvas gradebook: {out}")
            for sid in exports.unmatched(Path(args.course), roster, args.match) if roster else []:
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

    s = sub.add_parser("export", help="grades for Gradescope (results.json, an autograder zip) or Canvas (a gradebook CSV)")
    formats = s.add_subparsers(dest="format", required=True)
    e = formats.add_parser("gradescope", help="Gradescope's results.json for every graded submission of a course directory")
    e.add_argument("course", help="the course directory `grade --out` wrote")
    e.add_argument("--out", help="folder for <chapter>/<student>/results.json (default: COURSE/gradescope)")
    e.add_argument("--hidden-visibility", default="visible", choices=["visible", "hidden", "after_due_date", "after_published"])
    e = formats.add_parser(
        "gradescope-results", help="Gradescope's results.json from `check --json` output (run_autograder uses it)"
    )
    e.add_argument("check_json", help="the file `check --json` wrote (empty or missing when it could not grade)")
    e.add_argument("--stderr", help="the file `check` wrote its messages to (the reason when it could not grade)")
    e.add_argument("--chapter", required=True)
    e.add_argument("--out", help="where to write results.json (default: stdout)")
    e = formats.add_parser("gradescope-bundle", help="the autograder zip of a Gradescope programming assignment")
    e.add_argument("--chapter", required=True, help="the chapter the assignment grades (slug or number)")
    e.add_argument("--out", help="the zip to write (default: ./autograder-<chapter>.zip)")
    e = formats.add_parser("canvas", help="a gradebook CSV Canvas imports (Grades > Import)")
    e.add_argument("course", help="the course directory `grade --out` wrote (its grades.csv)")
    e.add_argument("--roster", help="a CSV exported from Canvas's gradebook: keep its students, ids and sections")
    e.add_argument(
        "--match", default="SIS User ID", help="the roster column holding the student ids grade used (default 'SIS User ID')"
    )
    e.add_argument("--out", help="the CSV to write (default: COURSE/canvas.csv)")
    s.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)
