"""``python -m mergeshield.report.schema_export [PATH]``: regenerate ``report.schema.json``."""

from mergeshield.report.io import main

if __name__ == "__main__":
    raise SystemExit(main())
