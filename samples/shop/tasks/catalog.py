"""Startup task: build the product catalog into os/ (machine state: rebuilt per image)."""

import json
import os
from pathlib import Path

catalog = Path(os.environ["ROLEHOST_OS_DIR"]) / "catalog.json"
products = [{"sku": f"sku-{n}", "name": f"Product {n}", "price": 5 + n} for n in range(50)]
catalog.write_text(json.dumps(products))
print(f"catalog: {len(products)} products in {catalog}")
