"""Write openapi/openapi.json from create_app(): sorted keys, stable output (tests/test_openapi.py checks it).

    python scripts/export_openapi.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT = REPO_ROOT / "openapi" / "openapi.json"


def render() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from service.app import create_app
    from service.config import Settings

    # default settings: the schema must not depend on the environment it is exported from
    app = create_app(Settings(_env_file=None), prepare_bucket=False)
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
