"""The operator panel: a station's slots in a browser on the line, served from the station's own process.

Modules: :mod:`.state` (what the panel shows, kept from the station's
events, desk and control), :mod:`.app` (the page, its live stream and its
buttons), :mod:`.server` (served by hypercorn on trio in the station's
nursery). ``docs/operating.md`` is the operator's side.
"""
