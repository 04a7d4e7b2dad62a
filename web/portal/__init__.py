"""The factory portal: every station's runs and devices in MongoDB, in a browser and over a JSON API.

Modules: :mod:`.query` (checked search parameters), :mod:`.data` (reading
MongoDB or a station's store), :mod:`.app` (pages and ``/api/v1``),
:mod:`.board` (the live line board), :mod:`.exports` (streamed CSV, XLSX,
JUnit), :mod:`.webhooks` (signed deliveries from an outbox), :mod:`.server`
(everything started together), :mod:`.cli` (``sequencer portal``).
``docs/portal.md`` is the user's side.

Nothing is imported here: ``sequencer`` builds its parser from :mod:`.cli`
on every invocation.
"""
