"""The arithmetic over records that quality reads: yields and failure Paretos.

Pure functions of records, with no storage and no markup, so the HTML
reports, the exports and the portal all count the same way.
"""
