"""The memory planner's per-rank estimate against the measured peak (RSS growth of two
training steps in spawned gloo processes), for the configurations of tests/test_plan.py
(the same functions as its ``test_planner_within_15_percent_of_measured_peak``):

    python bench/plan_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# testing/ and tests/ (helpers shared with the tests) are not installed: from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_plan import CASES, TOLERANCE, accuracy_table, format_table


def main() -> None:
    rows = accuracy_table(CASES)
    print(format_table(rows))
    within = sum(abs(row[3]) <= TOLERANCE for row in rows)
    print(f"within {TOLERANCE:.0%} (busiest rank): {within} of {len(rows)}")


if __name__ == "__main__":
    main()
