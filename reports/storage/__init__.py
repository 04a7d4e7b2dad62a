"""Where records are kept: the station's SQLite store, the shipper that forwards it, and MongoDB.

:mod:`.store` (the local store: journal, copier thread, recovery, queries),
:mod:`.shipper` (store-and-forward to MongoDB, in a child process),
:mod:`.mongo` (collections, documents and back to records), :mod:`.mongod`
(a real mongod for tests and development), :mod:`.mongo_cli` (``--mongo``,
``sync``, ``find``: the command line's glue).
"""
