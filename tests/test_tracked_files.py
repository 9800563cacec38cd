"""No large binary or archive in the repository outside docs/ (where the documentation's pictures live).

A wheel, a tarball or a database committed by mistake stays in the history for ever: every clone
pays for it. A file is binary when its first 8 KiB hold a NUL byte, or when its name is an
archive's.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness import REPO_ROOT

LIMIT_BYTES = 100 * 1024
SNIFF_BYTES = 8 * 1024
ALLOWED_UNDER = "docs/"
ARCHIVE_SUFFIXES = (
    ".whl", ".egg", ".zip", ".jar", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst", ".7z", ".rar",
    ".deb", ".rpm",
)


def repository_files() -> list[str]:
    """What git tracks, and what it would add (not ignored), as paths relative to the repository."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True, timeout=60,
    ).stdout
    return sorted({name for name in listed.decode().split("\0") if name})


def is_binary(path: Path) -> bool:
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return True
    with path.open("rb") as file:
        return b"\0" in file.read(SNIFF_BYTES)


def large_binaries(root: Path, names: list[str]) -> list[str]:
    found = []
    for name in names:
        path = root / name
        # A file deleted in the working tree is listed until the deletion is committed.
        if name.startswith(ALLOWED_UNDER) or not path.is_file() or path.is_symlink():
            continue
        if path.stat().st_size > LIMIT_BYTES and is_binary(path):
            found.append(f"{name} ({path.stat().st_size // 1024} KiB)")
    return found


def test_no_large_binary_or_archive_outside_docs() -> None:
    found = large_binaries(REPO_ROOT, repository_files())
    assert not found, (
        f"binary files over {LIMIT_BYTES // 1024} KiB outside {ALLOWED_UNDER}: {found}. Remove them (a build "
        "product or a download belongs in .gitignore), or, for a picture of the documentation, move it to docs/."
    )


def test_the_check_finds_a_large_binary_and_an_archive(tmp_path: Path) -> None:
    """The check itself, on files made for it: large binaries are found, text and small files are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "blob.bin").write_bytes(b"\0" * (LIMIT_BYTES + 1))
    (tmp_path / "bundle.whl").write_bytes(b"PK" + b"x" * LIMIT_BYTES)
    (tmp_path / "docs" / "picture.png").write_bytes(b"\0" * (LIMIT_BYTES + 1))
    (tmp_path / "notes.txt").write_bytes(b"text\n" * LIMIT_BYTES)
    (tmp_path / "small.bin").write_bytes(b"\0" * 10)
    names = ["blob.bin", "bundle.whl", "docs/picture.png", "notes.txt", "small.bin", "deleted.whl"]
    assert large_binaries(tmp_path, names) == ["blob.bin (100 KiB)", "bundle.whl (100 KiB)"]
