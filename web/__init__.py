"""The web stack: the services a browser or a script talks to, on starlette under hypercorn/trio.

:mod:`.server` starts an ASGI app on hypercorn in the caller's trio nursery.
:mod:`.provisioning` is the device provisioning service.
"""
