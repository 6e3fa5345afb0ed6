"""phiaudit.rules: correlation and anomaly rules compiled to ClickHouse SQL (issue 5).

Nothing is public yet; the package exists so that the layout and the import contract hold.
"""

__all__: list[str] = []
