"""The environment is part of the lock: requirements.txt (the runtime) and requirements-dev.txt (and the
tests' tools) pin every package with its hashes; this environment is exactly the dev lock; a declared
dependency that is not locked, or a file whose hash differs, fails."""

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "see CONTRIBUTING.md (\"The lock\"): `uv pip compile requirements.in -o requirements.txt …`"
ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^]]*\])?==(?P<version>[^\s;\\]+)"
                   r"(?:\s*;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def locked(path: Path) -> dict[str, tuple[str, str | None, list[str]]]:
    """name → (version, marker, sha256 hashes) for every entry of a `uv pip compile --generate-hashes` file."""
    entries: dict[str, tuple[str, str | None, list[str]]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        found = ENTRY.match(line)
        if found:
            current = canonicalize_name(found["name"])
            assert current not in entries, f"{path.name}: {current} locked twice"
            entries[current] = (found["version"], found["marker"], [])
        elif line.strip().startswith("--hash=sha256:") and current:
            entries[current][2].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
        else:  # nothing else: an entry this parser missed would lend its hashes to the one above
            assert not line.strip() or line.lstrip().startswith("#"), f"{path.name}, line {number}: {line!r}"
    return entries


def applies(marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate()


RUNTIME, DEV = locked(ROOT / "requirements.txt"), locked(ROOT / "requirements-dev.txt")


def test_every_entry_of_both_locks_has_hashes_and_the_runtime_is_the_dev_lock_s():
    assert len(RUNTIME) > 100 and len(DEV) > len(RUNTIME)
    assert all(len(hashes) >= 1 and all(len(h) == 64 for h in hashes) for _, _, hashes in DEV.values())
    assert all(len(hashes) >= 1 for _, _, hashes in RUNTIME.values())
    assert {name: RUNTIME[name] for name in RUNTIME} == {name: DEV[name] for name in RUNTIME}, \
        "the dev lock must install the runtime's very files: compile it with `-c requirements.txt`"


def declared() -> list[tuple[str, str]]:
    """(where, requirement) for every dependency this project declares: the .in files and pyproject.toml."""
    found = []
    for name in ("requirements.in", "requirements-dev.in"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith(("#", "-r", "-c")):
                found.append((name, line))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found += [("pyproject.toml", r) for r in project["dependencies"]]
    found += [(f"pyproject.toml [{extra}]", r) for extra, rs in project["optional-dependencies"].items()
              for r in rs if extra != "s3"]  # s3: documented for users with an S3 remote, not installed here
    return found


def test_every_declared_dependency_is_locked_at_a_version_it_allows():
    stale = []
    for where, text in declared():
        requirement = Requirement(text)
        entry = DEV.get(canonicalize_name(requirement.name))
        if requirement.marker and not requirement.marker.evaluate():
            continue
        if entry is None or not requirement.specifier.contains(entry[0], prereleases=True):
            stale.append(f"{where}: {text} (locked: {entry[0] if entry else 'nothing'})")
            continue
        for extra in requirement.extras:  # what the extra pulls in, as the locked version's metadata says
            for needed in map(Requirement, importlib.metadata.requires(requirement.name) or []):
                if needed.marker and needed.marker.evaluate({"extra": extra}) \
                        and not needed.marker.evaluate({"extra": ""}) \
                        and canonicalize_name(needed.name) not in DEV:
                    stale.append(f"{where}: {text} needs {needed} (locked: nothing)")
    assert not stale, "the lock is stale: " + "; ".join(stale) + f"; regenerate it, {REGENERATE}"


def test_this_environment_is_exactly_the_dev_lock():
    """What README's test line installed (CI: a fresh virtualenv) is the lock: every entry whose markers apply,
    at its version, and nothing else (pip, which installs the rest, and this project itself aside)."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    installed.pop("pip", None)
    installed.pop("mnist-pipeline", None)
    expected = {name: version for name, (version, marker, _) in DEV.items() if applies(marker)}
    assert installed == expected, (
        f"not locked: {sorted(set(installed) - set(expected))}; missing: {sorted(set(expected) - set(installed))}; "
        f"other versions: {sorted(n for n in set(installed) & set(expected) if installed[n] != expected[n])}"
    )


@pytest.mark.slow
def test_pip_installs_a_locked_file_and_refuses_one_whose_hash_differs(tmp_path):
    """pip's hash-checking mode, as README's lines use it, on a real file from PyPI (the one host these machines
    reach): the locked entry installs; the same entry with one hash digit changed fails before installing."""
    name = "typing-extensions"  # small, pure Python, no dependencies
    version, _, hashes = DEV[name]

    def install(digests: list[str], target: Path) -> subprocess.CompletedProcess:
        lock = tmp_path / f"{target.name}.txt"
        lock.write_text(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in digests) + "\n")
        # --isolated: no pip.conf or PIP_* settings (a local mirror, constraints): PyPI's own file.
        return subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--no-deps", "--target",
                               str(target), "-r", str(lock)], capture_output=True, text=True, timeout=300)

    good = install(hashes, tmp_path / "good")
    assert good.returncode == 0, good.stderr
    assert list((tmp_path / "good").glob("typing_extensions*.dist-info"))
    tampered = [h[:-1] + ("0" if h[-1] != "0" else "1") for h in hashes]
    bad = install(tampered, tmp_path / "bad")
    assert bad.returncode != 0 and "DO NOT MATCH THE HASHES" in bad.stderr, bad.stderr
    assert not list((tmp_path / "bad").glob("typing_extensions*"))
