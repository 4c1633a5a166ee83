"""Read a warehouse inventory from CSV and report what needs reordering."""

import csv
import sys
from dataclasses import dataclass


@dataclass
class Item:
    sku: str
    name: str
    quantity: int
    reorder_level: int
    unit_price: float


def parse_line(row):
    """One CSV row as an Item; raises ValueError on a malformed row."""
    sku, name, quantity, reorder_level, unit_price = row
    return Item(sku.strip(), name.strip(), int(quantity), int(reorder_level), float(unit_price))


def load_inventory(path):
    items = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)  # the header
        for number, row in enumerate(reader, start=2):
            try:
                items.append(parse_line(row))
            except ValueError as e:
                print(f"{path}:{number}: skipped: {e}", file=sys.stderr)
    return items


def needs_reorder(item):
    return item.quantity <= item.reorder_level


def stock_value(items):
    return sum(item.quantity * item.unit_price for item in items)


def report(items):
    low = [item for item in items if needs_reorder(item)]
    print(f"{len(items)} items, stock value {stock_value(items):.2f}")
    if not low:
        print("nothing to reorder")
        return
    print("to reorder:")
    for item in sorted(low, key=lambda item: item.quantity):
        print(f"  {item.sku:10} {item.name:30} {item.quantity:5} (reorder at {item.reorder_level})")


def main(argv):
    if len(argv) != 2:
        print("usage: inventory.py FILE.csv", file=sys.stderr)
        return 2
    report(load_inventory(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
