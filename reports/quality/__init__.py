"""Quality arithmetic: which runs are one unit, yields, Paretos and measurement statistics.

Pure functions of run records (or of sums a database computed), with no
formatting: the HTML pages, the exports, the period reports and the portal
all show the same numbers because they all come from here.
"""
