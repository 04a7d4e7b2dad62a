"""The portal's firmware build registry: CI uploads tagged builds, channels point at tags, stations download.

Modules: :mod:`.model` (names, manifests and their digest, shared with the
station's side in :mod:`fixtures.builds`), :mod:`.registry` (MongoDB and
GridFS), :mod:`.app` (the ``/api/v1/builds`` routes and the ``/builds``
page). ``docs/flashing.md`` says how CI uploads and how a station picks a
channel.
"""
