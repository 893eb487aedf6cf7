"""mnist-feedback: collect corrections from the command line, see them, freeze them, review them.

    mnist-feedback add --label N [--submitter NAME] FILE…     one label for these images
    mnist-feedback import FOLDER|FILE.csv [--submitter NAME] [--signed-in]
                                                               FOLDER/<digit>/*.png, or rows file,label[,submitter]
    mnist-feedback status                                      counts per class and submitter, agreement with the model
    mnist-feedback snapshot                                    new records → a DVC-tracked shard; prints what to commit
    mnist-feedback review [--accept ID…] [--reject ID…]        a person's verdict on any correction (asks: quarantined)
    mnist-feedback retire                                      delete from the store what DVC-tracked shards hold
    mnist-feedback export [--format jsonl|csv]                 one line per record, for pandas, SQL and operators
    mnist-feedback migrate DIR                                 a segment store (before the database) → this store
    mnist-feedback salt --export FILE | --import FILE          one pseudonym key for the stores of one project

Run from the repository root, no paths are needed: the live store is feedback/feedback.sqlite3 (as
`mnist-serve --feedback` writes it; `--store postgresql://…` for a shared one), the shards
data/feedback/, the model the exported ONNX.
Each image is prepared and scored exactly as `mnist-predict` does; a bad file is that file's
error line and the others are still recorded. Submitter names are stored only as salted
hashes (the store's key), like the server's client addresses.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import getpass
import json
import os
import re
import secrets
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from mnist_pipeline.defaults import DEFAULT_FEEDBACK_MAX_BYTES, DEFAULT_MAX_UPLOAD, DEFAULT_MODEL
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.feedback import snapshot as snapshots
from mnist_pipeline.feedback.records import (
    DEFAULT_SNAPSHOTS,
    Record,
    correction,
    new_id,
    read_files,
    read_shards,
    shards,
)
from mnist_pipeline.feedback.store import COUNT, DEFAULT_STORE, INSERT, Store, failure, row
from mnist_pipeline.fileio import write_bytes
from mnist_pipeline.serving.identity import TOKEN_LINE, TokensError, load_tokens, token_hash

DEFAULT_QUARANTINE = Path("metrics/quarantine.json")
MAX_ROWS = 1_000_000  # rows of one CSV import
ID = re.compile(r"[0-9a-f]{26}")  # records.new_id's: a shard's file name starts with one
Item = tuple[Path, int, tuple[str, str]]  # file, label, (identity kind, submitter name): records.pseudonym's


def parse_label(text: str) -> int:
    if len(text) != 1 or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected one digit 0–9, got {text!r}")
    return int(text)


def items_from(path: Path, submitter: str, signed_in: bool = False) -> tuple[list[Item], list[str]]:
    """(file, label, submitter) for a folder of digit subfolders or a CSV, and the rows that make no sense.

    A name in a CSV row is anyone's to write: unless `signed_in` vouches for the names (verified accounts),
    each is an anonymous identity, as cheap as a row, and curate treats it so."""
    items: list[Item] = []
    problems: list[str] = []
    if path.is_dir():
        for digit in range(10):
            folder = path / str(digit)
            if folder.is_dir():
                items += [(f, digit, ("name", submitter)) for f in sorted(folder.iterdir()) if f.is_file()]
        if not items:
            problems.append(f"{path}: no images in subfolders 0 … 9 (expected {path}/7/some.png)")
        return items, problems
    try:
        with path.open(newline="") as handle:
            for n, row in enumerate(csv.reader(handle), 1):
                if n > MAX_ROWS:
                    problems.append(f"{path}: more than {MAX_ROWS:,} rows; the rest are ignored")
                    break
                if n == 1 and row[:2] == ["file", "label"]:
                    continue
                label = row[1].strip() if len(row) in (2, 3) else ""
                if len(label) != 1 or label not in "0123456789":  # ASCII: "²".isdigit() holds, int("²") fails
                    problems.append(f"{path}:{n}: expected file,label[,submitter] with a label 0–9, got {row!r:.80}")
                    continue
                try:
                    image = (path.parent / row[0].strip()).resolve()
                except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
                    problems.append(f"{path}:{n}: {row[0].strip()!r:.80}: {exc}")
                    continue
                if not image.is_relative_to(path.parent.resolve()):  # a CSV names its own images, not /etc or ../
                    problems.append(f"{path}:{n}: {row[0].strip()!r:.80} is outside the CSV's folder")
                    continue
                named = len(row) == 3 and row[2].strip()
                who = (("name" if signed_in else "import"), row[2].strip()) if named else ("name", submitter)
                items.append((image, int(label), who))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{path}: cannot read it as a CSV ({exc})")
    return items, problems


def record_items(store: Store, model_path: Path, items: list[Item]) -> tuple[int, list[str]]:
    """Prepare, score (one batched call per chunk) and append each item: (recorded, error lines)."""
    from mnist_pipeline.exported import load_model
    from mnist_pipeline.images import ImageError, prepare, read_bounded

    model = load_model(model_path)
    identity = model.sha256  # of the bytes that score these
    recorded, errors = 0, []
    for start in range(0, len(items), 512):
        chunk, ready = items[start : start + 512], []
        for path, label, who in chunk:
            try:
                data = read_bounded(path, DEFAULT_MAX_UPLOAD)
                ready.append((path, label, who, prepare(data), data))
            except ImageError as exc:
                errors.append(f"{path}: error: {exc}")
        if not ready:
            continue
        probs = model.probabilities(np.stack([r[3] for r in ready]))
        recs = [
            correction(image, label, p, identity, store.submitter(*who), "cli", data)
            for (_, label, who, image, data), p in zip(ready, probs, strict=True)
        ]
        store.append(recs)  # one transaction a chunk: every line below is committed
        for (path, *_), rec in zip(ready, recs, strict=True):
            print(f"{path}: {rec.id} label {rec.label}, model said {rec.answer}")
        recorded += len(recs)
    return recorded, errors


@contextlib.contextmanager
def translated(store: Store) -> Iterator[None]:
    """A database error as the store's typed error: one line, no traceback."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise failure(exc, store.where) from None


def status(store: Store, folder: Path) -> list[str]:
    """What the store holds, counted by SQL."""
    with store.read() as conn, translated(store):

        def counts(sql: str) -> dict[Any, int]:
            return {key: int(n) for key, n in conn.execute(text(sql))}

        kinds = counts("SELECT kind, count(*) FROM records GROUP BY kind")
        new = conn.execute(text("SELECT count(*) FROM records WHERE snapshot IS NULL")).scalar_one()
        states = counts("SELECT state, count(*) FROM snapshots GROUP BY state")
        classes = counts("SELECT label, count(*) FROM records WHERE kind = 'correction' GROUP BY label")
        agree = conn.execute(text("SELECT count(*) FROM records WHERE kind = 'correction' AND label = answer"))
        agree = agree.scalar_one()
        per = conn.execute(
            text(
                "SELECT submitter, count(*) AS n FROM records WHERE kind = 'correction' "
                "GROUP BY submitter ORDER BY n DESC, submitter"
            )
        ).all()
    corrections = kinds.get("correction", 0)
    snapshotted = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"
    lines = [
        f"{store.where}: {corrections} corrections, {kinds.get('review', 0)} reviews, {new} not yet in a snapshot "
        f"(snapshots: {snapshotted}; {folder}: {len(shards(folder))} shards); {store.used_bytes():,} of "
        f"{store.max_bytes:,} bytes held"
    ]
    if corrections:
        lines.append("per class: " + "  ".join(f"{c}: {classes.get(c, 0)}" for c in range(10)))
        lines.append(
            f"agreement with the model that answered: {agree / corrections:.1%} "
            f"({corrections - agree} corrections of its answer)"
        )
        lines.append(f"submitters: {len(per)}; most records: " + ", ".join(f"{s} {n}" for s, n in per[:5]))
    return lines


EXPORTED = (
    "id",
    "time",
    "kind",
    "label",
    "answer",
    "probabilities",
    "submitter",
    "source",
    "model",
    "target",
    "verdict",
)


def export(store: Store, form: str, out: IO[str]) -> int:
    """Every record, one line each (JSON lines or CSV with a header), in id order; the count."""
    writer = csv.writer(out, lineterminator="\n") if form == "csv" else None
    if writer:
        writer.writerow(EXPORTED)
    count = 0
    with store.read() as conn, translated(store):
        rows = conn.execution_options(stream_results=True, yield_per=2000).execute(
            text(f"SELECT {', '.join(EXPORTED)} FROM records ORDER BY id")
        )
        for row in rows:
            values = dict(row._mapping)
            values["probabilities"] = json.loads(values["probabilities"])
            if writer:
                writer.writerow([json.dumps(values[k]) if k == "probabilities" else values[k] for k in EXPORTED])
            else:
                out.write(json.dumps(values, separators=(",", ":")) + "\n")
            count += 1
    return count


def write_secret(path: Path, data: bytes) -> None:
    """`data` to `path`, readable by its owner only, whole or not at all."""
    import os
    import tempfile

    from mnist_pipeline.fileio import fsync_dir

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def migrate(store: Store, old: Path) -> list[str]:
    """Every readable record of a segment store (OLD/segments/*.seg, before the database) into `store`, once
    by id, with OLD's salt, so that pseudonyms go on; what could not be read, each a line."""
    segments = sorted((old / "segments").glob("*.seg"))
    if not segments:
        raise PipelineError(f"{old}: no segments/*.seg: not a segment store")
    with store.read() as conn, translated(store):
        if conn.execute(text("SELECT count(*) FROM snapshots")).scalar_one():
            # Retire deletes what snapshots took: "once by id" could no longer see those records.
            raise PipelineError(
                f"{store.where} has snapshots already: migrate into a store before its first snapshot, so that no "
                "record is taken twice"
            )
    salt = (old / "salt").read_bytes() if (old / "salt").is_file() else None
    if salt is not None:
        store.set_salt(salt)  # the pseudonyms go on as they were
    found = read_files(segments)
    odd = {r.id for r in found.records if not ID.fullmatch(r.id) or (r.target and not ID.fullmatch(r.target))}
    with translated(store), store.writing() as conn:
        if conn.execute(text("SELECT count(*) FROM snapshots")).scalar_one():
            raise PipelineError(f"{store.where}: a snapshot was taken meanwhile; migrate into a new store")
        have = {r[0] for r in conn.execute(text("SELECT id FROM records"))}
        new = {r.id: r for r in found.records if r.id not in have and r.id not in odd}
        rows = [row(r) for r in new.values()]
        if rows:
            conn.execute(INSERT, rows)
            conn.execute(COUNT, {"writer": "migrated", "bytes": sum(r["bytes"] for r in rows)})
    lines = [
        f"{len(new)} records migrated from {len(segments)} segments of {old} into {store.where} "
        f"({len(found.records) - len(new) - len(odd)} already there){'' if salt else '; no salt in ' + str(old)}"
    ]
    lines += [f"not read: {t} (a write that failed or was killed mid-record: never acknowledged)" for t in found.torn]
    lines += [f"not read: {s}" for s in found.skipped]
    lines += [f"not read: a record whose id is not one this project makes ({i[:40]!r})" for i in sorted(odd)]
    return lines


def ascii_digit(image: np.ndarray) -> str:
    """A 28×28 digit as 14 lines of text, two pixel rows per line (upper and lower half blocks)."""
    shades = image >= 0.35
    rows = []
    for y in range(0, 28, 2):
        rows.append(
            "".join(
                {(True, True): "█", (True, False): "▀", (False, True): "▄"}.get(
                    (bool(shades[y, x]), bool(shades[y + 1, x])), " "
                )
                for x in range(28)
            )
        )
    return "\n".join(rows)


def review(store: Store, folder: Path, quarantine: Path, verdicts: dict[str, str], reviewer: str) -> list[str]:
    """Append a review record per verdict on any correction (the gate scores the held-out users' accepted ones);
    with no verdicts given, ask about each quarantined item."""
    try:
        entries = json.loads(quarantine.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{quarantine}: no quarantine list ({exc}); run `dvc repro curate` first") from None
    reasons = {e["id"]: e["reason"] for e in entries}
    known = {r.id: r for r in read_shards(folder).records + store.get(list(reasons) + list(verdicts))}
    done = {r.target for r in known.values() if r.kind == "review"}
    lines = []
    if not verdicts:
        if not sys.stdin.isatty():
            raise PipelineError("review needs a terminal, or --accept/--reject with ids")
        for item_id, reason in reasons.items():
            rec = known.get(item_id)
            if rec is None or item_id in done or rec.image is None:
                continue
            print(ascii_digit(rec.image))
            status = (
                "a held-out user's: judged, it is a gate digit" if reason == "user_split" else f"quarantined: {reason}"
            )
            print(
                f"{item_id}: labelled {rec.label}, the model said {rec.answer} "
                f"(p(label) {rec.probabilities[rec.label]:.3f}); {status}"
            )
            choice = input("[a]ccept  [r]eject  [s]kip  [q]uit? ").strip().lower()[:1]
            if choice == "q":
                break
            if choice in ("a", "r"):
                verdicts[item_id] = "accept" if choice == "a" else "reject"
    for item_id, verdict in verdicts.items():
        rec = known.get(item_id)
        if rec is None or rec.kind != "correction":
            lines.append(f"{item_id}: error: no such correction in the store or {folder}")
            continue
        rec = Record(
            id=new_id(),
            time=0.0,
            kind="review",
            submitter=store.submitter("name", reviewer),
            source="cli",
            target=item_id,
            verdict=verdict,
        )
        store.append([rec])
        lines.append(f"{item_id}: {verdict}ed; it counts from the next snapshot")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-feedback", description="Users' corrections → versioned training data.")
    parser.add_argument(
        "--store",
        default=DEFAULT_STORE,
        help=f"the live store: a folder (SQLite) or a postgresql:// URL (default {DEFAULT_STORE}/)",
    )
    parser.add_argument(
        "--snapshots", type=Path, default=DEFAULT_SNAPSHOTS, help=f"DVC-tracked shards (default {DEFAULT_SNAPSHOTS}/)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="record images with one label")
    add.add_argument("--label", type=parse_label, required=True)
    add.add_argument("files", nargs="+", type=Path)
    imp = sub.add_parser("import", help="record a folder of digit subfolders, or a CSV of file,label[,submitter]")
    imp.add_argument("source", type=Path)
    imp.add_argument(
        "--signed-in",
        action="store_true",
        help="the CSV's submitter names are verified accounts (default: each is anonymous, as cheap as a row)",
    )
    for p in (add, imp):
        p.add_argument("--submitter", default=getpass.getuser(), help="who labelled them (stored as a salted hash)")
        p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"scores them (default {DEFAULT_MODEL})")
    sub.add_parser("status", help="what has been collected")
    snap = sub.add_parser("snapshot", help="freeze what is new into a DVC-tracked shard")
    snap.add_argument("--no-dvc", action="store_true", help="write the shard only; `dvc add` it yourself")
    sub.add_parser("retire", help="delete from the store the records of shards DVC tracks (and has pushed)")
    exp = sub.add_parser("export", help="print every record, one line each")
    exp.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    mig = sub.add_parser("migrate", help="read a segment store (before the database) into this store")
    mig.add_argument("source", type=Path)
    salt = sub.add_parser("salt", help="share the pseudonym key between stores of one project")
    way = salt.add_mutually_exclusive_group(required=True)
    way.add_argument("--export", type=Path, metavar="FILE", help="write this store's salt to FILE (0600)")
    way.add_argument("--import", dest="load", type=Path, metavar="FILE", help="key this new store with FILE's salt")
    tok = sub.add_parser("token", help="make an API token for `mnist-serve --tokens FILE` (FILE keeps its hash)")
    tok.add_argument("name", help="the submitter its corrections are from")
    tok.add_argument("--file", type=Path, required=True, help="the tokens file to add it to (made if missing)")
    rev = sub.add_parser("review", help="accept or reject quarantined corrections")
    rev.add_argument("--quarantine", type=Path, default=DEFAULT_QUARANTINE)
    rev.add_argument("--accept", nargs="*", action="extend", default=[], metavar="ID")
    rev.add_argument("--reject", nargs="*", action="extend", default=[], metavar="ID")
    rev.add_argument("--reviewer", default=getpass.getuser())
    return parser


def add_token(path: Path, name: str) -> str:
    """A new random token for `name`, its hash appended to the tokens file (the token itself is stored nowhere).
    One writer at a time (a lock file beside it); the file keeps its mode; a damaged file is refused, not extended."""
    if not TOKEN_LINE.match(f"{name} sha256:{'0' * 64}"):
        raise TokensError(f"{name!r}: a token's name is 1 to 256 characters, no spaces, not starting with #")
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known, mode = "", 0o644
        if path.exists():
            load_tokens(path)
            known, mode = path.read_text(), stat.S_IMODE(path.stat().st_mode)
        token = secrets.token_urlsafe(32)
        line = f"{name} sha256:{token_hash(token)}\n"
        write_bytes(path, (known + ("\n" if known and not known.endswith("\n") else "") + line).encode())
        if known:
            os.chmod(path, mode)
    return token


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        try:
            token = add_token(args.file, args.name)
        except (TokensError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{args.file}: a token for {args.name!r}; it is shown once: the file keeps its hash", file=sys.stderr)
        print(token)
        return 0
    try:
        # Reading opens the store read-only, unchecked: what a damaged store still holds can be exported.
        reading = args.command in ("status", "export")
        store = Store(args.store, DEFAULT_FEEDBACK_MAX_BYTES, check=not reading, readonly=reading)
        if args.command == "status":
            print("\n".join(status(store, args.snapshots)))
            return 0
        if args.command == "export":
            print(f"{export(store, args.format, sys.stdout)} records", file=sys.stderr)
            return 0
        if args.command == "salt":
            if args.export:
                write_secret(args.export, store.salt)
                print(f"{store.where}: its salt is in {args.export}; keep it secret (it unmasks pseudonyms)")
            else:
                store.set_salt(args.load.read_bytes())
                print(f"{store.where}: keyed by the salt in {args.load}")
            return 0
        if args.command == "migrate":
            lines = migrate(store, args.source)
            print("\n".join(lines))
            return 1 if len(lines) > 1 else 0
        if args.command == "snapshot":
            snap = snapshots.take(store, args.snapshots)
            if not snap.paths:
                print(f"nothing new: {snap.total} records are already in snapshots; no new version")
                return 0
            if not args.no_dvc:  # this snapshot's shards, and any an earlier one left untracked
                for path in snapshots.untracked(args.snapshots):
                    snapshots.track(path)
            added = " ".join(f"{p}.dvc" for p in snap.paths)
            print(
                f"{', '.join(map(str, snap.paths))}: {snap.new} new records ({snap.total} in all). Commit and share "
                f"it:\n  git add {added} {args.snapshots}/.gitignore && git commit -m 'Snapshot {snap.new} "
                f"corrections'\n  dvc push   # uploads the new shards only; then `mnist-feedback retire` frees "
                "the store\n"
                "then `dvc repro` trains on it."
            )
            return 0
        if args.command == "retire":
            done = snapshots.retire(store, args.snapshots)
            print(
                f"{done.removed} records deleted from {store.where}: they are in {len(done.shards)} shard(s) that "
                f"DVC tracks in {args.snapshots}" + (f" ({', '.join(done.shards)})" if done.shards else "")
            )
            for line in done.kept:
                print(f"kept: {line}")
            return 0
        if args.command == "review":
            verdicts = {**{i: "accept" for i in args.accept}, **{i: "reject" for i in args.reject}}
            lines = review(store, args.snapshots, args.quarantine, verdicts, args.reviewer)
            print("\n".join(lines))
            return 1 if any(": error:" in line for line in lines) else 0
        if args.command == "add":
            items, problems = [(f, args.label, ("name", args.submitter)) for f in args.files], list[str]()
        else:
            items, problems = items_from(args.source, args.submitter, args.signed_in)
        recorded, errors = record_items(store, args.model, items) if items else (0, [])
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in problems + errors:
        print(line, file=sys.stderr)
    print(
        f"{recorded} recorded in {store.where}; `mnist-feedback snapshot` makes them a pipeline input", file=sys.stderr
    )
    return 1 if problems or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
