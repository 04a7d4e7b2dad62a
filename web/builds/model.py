"""What a firmware build is, to the registry and to a station: names, its manifest, and the manifest's digest.

Shared by both sides, so they agree byte for byte: the portal's registry
(:mod:`web.builds.registry`) stores a build with this manifest, and a station
(:mod:`fixtures.builds`) checks every file it downloads, and every file it
finds in its cache, against it. Plain values, no I/O beyond reading files.

A manifest lists every file of the build by its path relative to the build's
folder (``flasher_args.json``, ``bootloader/bootloader.bin``, ...), its size
and its SHA-256. Its *digest* is the SHA-256 of its canonical JSON (files
sorted by path): two builds with one digest hold the same bytes at the same
paths, whatever their tags, so a record's digest names what was flashed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = ["FLASHER_ARGS", "BuildRef", "Manifest", "ManifestFile", "ManifestError", "check_name",
           "check_path"]

#: The file a build must hold: ESP-IDF's description of what goes where (fixtures/images.py reads it).
FLASHER_ARGS = "flasher_args.json"
#: Products, tags and channels: what a person types and a URL carries without quoting.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
#: A file's path inside a build: relative, forward slashes, no "..", nothing a shell or a URL must quote.
_PATH_PART = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_FILES = 64
MAX_PATH = 255


class ManifestError(ValueError):
    """A name, path or manifest that cannot be a build's; the message is one line naming it."""


def check_name(value: object, what: str) -> str:
    """``value`` if it can be a product, tag or channel name (letters, digits, ``. _ + -``; at most 64)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else value
        raise ManifestError(f"{what} {shown!r}: 1 to 64 letters, digits and . _ + -, starting with a letter or digit")
    return value


def check_path(value: object) -> str:
    """``value`` if it can be a file's path in a build (relative, ``/`` separated, no ``..``)."""
    if not isinstance(value, str) or len(value) > MAX_PATH or not value:
        raise ManifestError(f"file path {str(value)[:80]!r}: 1 to {MAX_PATH} characters")
    if not all(_PATH_PART.fullmatch(part) for part in value.split("/")):
        raise ManifestError(f"file path {value!r}: relative, '/' between parts, each part letters, digits and "
                            ". _ + - (not starting with '.')")
    return value


@attrs.frozen
class BuildRef:
    """What a station asks for: a product and a channel, ``esp32-sensor@stable``."""

    product: str
    channel: str

    @classmethod
    def parse(cls, text: str) -> BuildRef:
        product, at, channel = text.partition("@")
        if not at:
            raise ManifestError(f"build {text[:80]!r}: give PRODUCT@CHANNEL, e.g. esp32-sensor@stable")
        return cls(check_name(product, "product"), check_name(channel, "channel"))

    def __str__(self) -> str:
        return f"{self.product}@{self.channel}"


@attrs.frozen
class ManifestFile:
    path: str
    size: int
    sha256: str


@attrs.frozen
class Manifest:
    """Every file of one build, with its size and SHA-256."""

    product: str
    tag: str
    files: tuple[ManifestFile, ...] = attrs.field(converter=lambda fs: tuple(sorted(fs, key=lambda f: f.path)))

    @property
    def name(self) -> str:
        """``esp32-sensor@v1.2.3``: the product and the tag, as records and messages name a build."""
        return f"{self.product}@{self.tag}"

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical file list: the same bytes at the same paths, the same digest."""
        return files_digest(self.files)

    def file(self, path: str) -> ManifestFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"product": self.product, "tag": self.tag, "digest": self.digest,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]}

    @classmethod
    def from_json(cls, data: Any, *, where: str = "manifest") -> Manifest:
        """A manifest from its JSON form, every field checked; a ``digest`` given must be the files' own."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: not a JSON object")
        unknown = set(data) - {"product", "tag", "digest", "files", "channel"}
        if unknown:
            raise ManifestError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        files_data = data.get("files")
        if not isinstance(files_data, list) or not files_data:
            raise ManifestError(f"{where}: \"files\" must be a list of at least one file")
        if len(files_data) > MAX_FILES:
            raise ManifestError(f"{where}: {len(files_data)} files, more than a build may hold ({MAX_FILES})")
        files = []
        for entry in files_data:
            if not isinstance(entry, Mapping) or set(entry) != {"path", "size", "sha256"}:
                raise ManifestError(f"{where}: each file is {{\"path\", \"size\", \"sha256\"}}")
            path, size, sha = check_path(entry["path"]), entry["size"], entry["sha256"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ManifestError(f"{where}: {path}: size must be a whole number of bytes")
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise ManifestError(f"{where}: {path}: sha256 must be 64 lower-case hex digits")
            files.append(ManifestFile(path, size, sha))
        if len({f.path for f in files}) != len(files):
            raise ManifestError(f"{where}: a file is listed twice")
        manifest = cls(check_name(data.get("product"), "product"), check_name(data.get("tag"), "tag"), files)
        if manifest.file(FLASHER_ARGS) is None:
            raise ManifestError(f"{where}: no {FLASHER_ARGS} (the build's description of what goes where)")
        if "digest" in data and data["digest"] != manifest.digest:
            raise ManifestError(f"{where}: its digest is not its files' ({manifest.digest})")
        return manifest


def files_digest(files: Iterable[ManifestFile]) -> str:
    canonical = [[f.path, f.size, f.sha256] for f in sorted(files, key=lambda f: f.path)]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
