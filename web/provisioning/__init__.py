"""The provisioning service: idempotent device registration for the factory line.

A station's ``register`` phase (``phases/register.py``) POSTs each tested
device's identity here; the service gives it a ``device_id`` and a
human-friendly ``claim_code`` (printed on the label) and keeps its broker
credentials, the password as a salted hash only. Registering is idempotent:
the station sends an ``Idempotency-Key`` per run and serial, so a retried
request (a lost response, a timeout, a retried phase) never creates a second
device, and a retest of the same unit gets back the device it already has.
``docs/provisioning.md`` has the API and the rules.

Modules: :mod:`.model` (validation, hashing, records), :mod:`.storage`
(SQLite or MongoDB), :mod:`.app` (the ASGI app and the registration rules),
:mod:`.server` (hypercorn on trio), :mod:`.cli` (``sequencer provision-server``).

Nothing is imported here: ``sequencer`` builds its argument parser from
:mod:`.cli` on every invocation and must not pay for starlette, hypercorn and
pymongo unless the service actually runs.
"""
