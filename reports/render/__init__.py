"""Records made readable: self-contained HTML (jinja2 templates, inline SVG) and tables (xlsx, CSV).

Rendering takes records and the arithmetic of :mod:`reports.quality`; it
neither reads a store nor serves anything.
"""
