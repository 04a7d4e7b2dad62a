"""The portal's build registry: tagged firmware builds in MongoDB (GridFS), channels pointing at tags.

A build is a product and a tag (``esp32-sensor@v1.2.3``); its files live in
the GridFS bucket ``build_files``, its manifest (every file's path, size and
SHA-256, :mod:`web.builds.model`) in ``builds``. A tag is never rewritten:
uploading the same files again under it is a no-op (a CI job retried), other
files are refused. A channel (``stable``, ``beta``) names one tag of a
product, in ``build_channels``; moving it keeps who moved it and when.

Everything here is blocking pymongo; the routes call it through
``trio.to_thread.run_sync``. Files are written to GridFS first and the
manifest last, so a build is visible only once every byte is stored; an
upload that dies half-way leaves chunks nobody refers to, which the next
upload of that tag removes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import gridfs
import pymongo
import pymongo.errors

from web.builds.model import Manifest, ManifestError, ManifestFile, check_name

__all__ = ["BUCKET", "BuildConflict", "BuildRegistry", "UnknownBuild"]

BUILDS, CHANNELS, BUCKET = "builds", "build_channels", "build_files"
#: How far back the builds page looks for the stations that flashed each build.
FLASHED_DAYS = 30
_CHUNK = 255 * 1024


class UnknownBuild(LookupError):
    """No such build, tag or channel; the message names it."""


class BuildConflict(ValueError):
    """The tag exists with other files: tags are never rewritten."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def build_id(product: str, tag: str) -> str:
    return f"{product}@{tag}"


class BuildRegistry:
    """Builds and channels in one MongoDB database. Blocking; thread-safe (pymongo's client is)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.bucket = gridfs.GridFSBucket(db, bucket_name=BUCKET, chunk_size_bytes=_CHUNK)

    def ensure(self) -> None:
        """Indexes (idempotent)."""
        self.db[BUILDS].create_index([("product", 1), ("uploaded_at", -1)], name="product_uploaded")
        self.db[f"{BUCKET}.files"].create_index([("metadata.build", 1)], name="build")

    # -- writing -------------------------------------------------------------------------

    def upload(self, manifest: Manifest, files: Mapping[str, BinaryIO], *, by: str) -> tuple[Manifest, bool]:
        """Store ``manifest``'s files (read from ``files``, by path); True if the build is new.

        Each file's bytes are hashed as they are stored and must be the
        manifest's: what the uploader meant is what the stations get.
        """
        if set(files) != {f.path for f in manifest.files}:
            missing = sorted({f.path for f in manifest.files} - set(files))
            extra = sorted(set(files) - {f.path for f in manifest.files})
            raise ManifestError(f"{manifest.name}: " + (f"no file sent for {missing[0]}" if missing
                                                        else f"{extra[0]} is not in the manifest"))
        key = build_id(manifest.product, manifest.tag)
        existing = self.db[BUILDS].find_one({"_id": key})
        if existing is not None:
            return self._same_or_conflict(existing, manifest), False
        self._remove_files(key)  # what an earlier, unfinished upload of this tag left
        stored: list[dict[str, Any]] = []
        try:
            for entry in manifest.files:
                stored.append(self._store_file(key, entry, files[entry.path]))
            doc = {"_id": key, "product": manifest.product, "tag": manifest.tag, "digest": manifest.digest,
                   "size": manifest.size, "files": stored, "uploaded_by": by, "uploaded_at": _now()}
            self.db[BUILDS].insert_one(doc)
        except pymongo.errors.DuplicateKeyError:
            # Another upload of this tag finished first: ours is the same build, or a conflict.
            self._remove_ids(s["file_id"] for s in stored)
            return self._same_or_conflict(self.db[BUILDS].find_one({"_id": key}), manifest), False
        except BaseException:
            self._remove_ids(s["file_id"] for s in stored)
            raise
        return manifest, True

    def _same_or_conflict(self, existing: Mapping[str, Any], manifest: Manifest) -> Manifest:
        if existing["digest"] != manifest.digest:
            raise BuildConflict(f"{manifest.name} exists with other files (digest {existing['digest'][:12]}): a "
                                "tag is never rewritten; give the build a new tag")
        return manifest

    def _store_file(self, key: str, entry: ManifestFile, source: BinaryIO) -> dict[str, Any]:
        digest, size = hashlib.sha256(), 0

        def chunks() -> Iterator[bytes]:
            nonlocal size
            while block := source.read(_CHUNK):
                digest.update(block)
                size += len(block)
                yield block

        with self.bucket.open_upload_stream(entry.path, metadata={"build": key, "path": entry.path}) as stream:
            for block in chunks():
                stream.write(block)
            file_id = stream._id
        if size != entry.size or digest.hexdigest() != entry.sha256:
            self._remove_ids([file_id])
            raise ManifestError(f"{key}: {entry.path}: the bytes sent ({size} bytes, SHA-256 "
                                f"{digest.hexdigest()[:12]}...) are not the manifest's ({entry.size} bytes, "
                                f"{entry.sha256[:12]}...)")
        return {"path": entry.path, "size": entry.size, "sha256": entry.sha256, "file_id": file_id}

    def _remove_files(self, key: str) -> None:
        self._remove_ids(d["_id"] for d in self.db[f"{BUCKET}.files"].find({"metadata.build": key}, {"_id": 1}))

    def _remove_ids(self, ids: Any) -> None:
        for file_id in list(ids):
            try:
                self.bucket.delete(file_id)
            except gridfs.errors.NoFile:
                pass

    def set_channel(self, product: str, channel: str, tag: str, *, by: str) -> dict[str, Any]:
        """Point ``product``'s ``channel`` at ``tag`` (which must exist); the channel as it now is."""
        check_name(channel, "channel")
        if self.db[BUILDS].find_one({"_id": build_id(product, tag)}, {"_id": 1}) is None:
            raise UnknownBuild(f"no build {product}@{tag}: upload it first")
        now = _now()
        before = self.db[CHANNELS].find_one_and_update(
            {"_id": build_id(product, channel)},
            {"$set": {"product": product, "channel": channel, "tag": tag, "moved_by": by, "moved_at": now}},
            upsert=True)
        if before is not None and before.get("tag") != tag:
            self.db[CHANNELS].update_one({"_id": build_id(product, channel)},
                                         {"$set": {"previous": before.get("tag")}})
        return self.channel(product, channel)

    # -- reading -----------------------------------------------------------------------------

    def manifest(self, product: str, tag: str) -> Manifest:
        doc = self.db[BUILDS].find_one({"_id": build_id(product, tag)}, {"files.file_id": 0})
        if doc is None:
            raise UnknownBuild(f"no build {product}@{tag}")
        return _manifest(doc)

    def channel(self, product: str, channel: str) -> dict[str, Any]:
        doc = self.db[CHANNELS].find_one({"_id": build_id(product, channel)})
        if doc is None:
            raise UnknownBuild(f"{product} has no channel {channel!r}")
        return doc

    def channel_manifest(self, product: str, channel: str) -> Manifest:
        return self.manifest(product, self.channel(product, channel)["tag"])

    def open_file(self, product: str, tag: str, path: str) -> tuple[ManifestFile, Any]:
        """The manifest's entry for ``path`` and a GridFS stream of its bytes (the caller closes it)."""
        doc = self.db[BUILDS].find_one({"_id": build_id(product, tag)}, {"files": 1})
        entry = next((f for f in (doc or {}).get("files", ()) if f["path"] == path), None)
        if entry is None:
            raise UnknownBuild(f"no file {path!r} in {product}@{tag}")
        return ManifestFile(entry["path"], entry["size"], entry["sha256"]), self.bucket.open_download_stream(
            entry["file_id"])

    def builds(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest builds, each with the channels that point at it."""
        channels = self.channels()
        docs = list(self.db[BUILDS].find({}, {"files.file_id": 0}).sort("uploaded_at", -1).limit(limit))
        for doc in docs:
            doc["channels"] = [c["channel"] for c in channels if c["product"] == doc["product"]
                               and c["tag"] == doc["tag"]]
        return docs

    def channels(self) -> list[dict[str, Any]]:
        return list(self.db[CHANNELS].find().sort([("product", 1), ("channel", 1)]))

    def flashed(self, days: int = FLASHED_DAYS) -> list[dict[str, Any]]:
        """Which station flashed which build, from the runs stations shipped: runs, last time, per station and build.

        A flash phase records the build as its ``build`` and ``build_sha256``
        measurements (``phases/esp32.py``), which every ``runs`` document
        repeats, flat, in ``measurements``.
        """
        since = _now() - dt.timedelta(days=days)
        pipeline: Sequence[Mapping[str, Any]] = [
            {"$match": {"started_at": {"$gte": since}, "measurements.name": "build"}},
            {"$project": {"station": 1, "started_at": 1, "measurements": {"$filter": {
                "input": "$measurements", "cond": {"$in": ["$$this.name", ["build", "build_sha256"]]}}}}},
            {"$project": {"station": 1, "started_at": 1,
                          "build": {"$first": {"$filter": {"input": "$measurements",
                                                           "cond": {"$eq": ["$$this.name", "build"]}}}},
                          "digest": {"$first": {"$filter": {"input": "$measurements",
                                                            "cond": {"$eq": ["$$this.name", "build_sha256"]}}}}}},
            {"$group": {"_id": {"station": "$station", "build": "$build.value", "digest": "$digest.value"},
                        "runs": {"$sum": 1}, "last": {"$max": "$started_at"}}},
            {"$sort": {"last": -1}},
            {"$limit": 500},
        ]
        return [{"station": d["_id"]["station"], "build": d["_id"]["build"], "digest": d["_id"].get("digest"),
                 "runs": d["runs"], "last": d["last"]} for d in self.db["runs"].aggregate(list(pipeline))]


def _manifest(doc: Mapping[str, Any]) -> Manifest:
    return Manifest(doc["product"], doc["tag"], [ManifestFile(f["path"], f["size"], f["sha256"]) for f in doc["files"]])
