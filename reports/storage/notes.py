"""Notes and dispositions on devices and runs, in MongoDB beside the records.

A quality engineer or a line lead writes a note on a device (or on one of its
runs) and may set the device's disposition with it: released, rework, scrap,
RMA or hold. Notes are append-only: a correction is a new note, so the
history of who decided what, and when, is never rewritten. The device's
disposition is the one its newest note set. The collection's ``$jsonSchema``
refuses a note without author, time or text, and any disposition but those.

Blocking pymongo: called through ``trio.to_thread.run_sync`` by the portal,
directly by ``sequencer find``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import attrs
import bson
import pymongo.errors

__all__ = ["DISPOSITIONS", "NOTES", "Note", "add_note", "ensure_notes", "notes_for"]

NOTES = "notes"
DISPOSITIONS = ("released", "rework", "scrap", "rma", "hold")
MAX_TEXT = 10_000

NOTES_VALIDATOR: dict[str, Any] = {"$jsonSchema": {
    "bsonType": "object",
    "required": ["_id", "serial", "author", "role", "text", "created_at"],
    "additionalProperties": False,
    "properties": {
        "_id": {"bsonType": "objectId"},
        "serial": {"bsonType": "string", "minLength": 1, "maxLength": 128},
        "run_id": {"bsonType": ["string", "null"], "maxLength": 128},
        "author": {"bsonType": "string", "minLength": 1, "maxLength": 64},
        "role": {"bsonType": "string"},
        "text": {"bsonType": "string", "maxLength": MAX_TEXT},
        "disposition": {"enum": [*DISPOSITIONS, None]},
        "created_at": {"bsonType": "date"},
    },
}}


@attrs.frozen
class Note:
    """One note: on a device (``serial``), maybe about one of its runs, maybe setting its disposition."""

    serial: str
    author: str
    role: str
    text: str
    created_at: dt.datetime
    run_id: str | None = None
    disposition: str | None = None
    note_id: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"note_id": self.note_id, "serial": self.serial, "run_id": self.run_id, "author": self.author,
                "role": self.role, "text": self.text, "disposition": self.disposition,
                "created_at": self.created_at.isoformat()}


def ensure_notes(db: Any) -> None:
    """Create ``notes`` with its validator and index (idempotent; two portals may race)."""
    options = {"validator": NOTES_VALIDATOR, "validationLevel": "strict", "validationAction": "error"}
    if NOTES in db.list_collection_names():
        db.command("collMod", NOTES, **options)
    else:
        try:
            db.create_collection(NOTES, **options)
        except pymongo.errors.CollectionInvalid:
            db.command("collMod", NOTES, **options)
    db[NOTES].create_index([("serial", 1), ("created_at", 1)], name="serial_created")


def add_note(db: Any, note: Note) -> Note:
    """Store ``note`` (never updated afterwards); the stored note, with its id, comes back."""
    if note.disposition is not None and note.disposition not in DISPOSITIONS:
        raise ValueError(f"disposition: {note.disposition!r} is not one of {', '.join(DISPOSITIONS)}")
    if not note.text.strip() and note.disposition is None:
        raise ValueError("a note needs text or a disposition")
    if len(note.text) > MAX_TEXT:
        raise ValueError(f"a note is at most {MAX_TEXT} characters")
    oid = bson.ObjectId()
    doc = {"_id": oid, "serial": note.serial, "run_id": note.run_id, "author": note.author, "role": note.role,
           "text": note.text, "disposition": note.disposition,
           # BSON keeps milliseconds: the stored time is the one returned
           "created_at": note.created_at.replace(microsecond=note.created_at.microsecond // 1000 * 1000)}
    db[NOTES].insert_one(doc)
    return _note(doc)


def notes_for(db: Any, serials: Iterable[str]) -> dict[str, list[Note]]:
    """Every note of each serial, oldest first."""
    out: dict[str, list[Note]] = {s: [] for s in serials}
    if out:
        for doc in db[NOTES].find({"serial": {"$in": list(out)}}).sort([("created_at", 1), ("_id", 1)]):
            out[doc["serial"]].append(_note(doc))
    return out


def disposition(notes: Iterable[Note]) -> str | None:
    """The disposition the newest note that set one set."""
    current = None
    for n in notes:
        if n.disposition is not None:
            current = n.disposition
    return current


def _note(doc: dict[str, Any]) -> Note:
    when = doc["created_at"]
    when = when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when
    return Note(serial=doc["serial"], author=doc["author"], role=doc["role"], text=doc["text"], created_at=when,
                run_id=doc.get("run_id"), disposition=doc.get("disposition"), note_id=str(doc["_id"]))
