"""How a decode batch splits into compiled buckets: the cheapest sequence by measured cost.

36 rows, buckets {4: 30 ms, 32: 90 ms, 64: 170 ms}:
one bucket:  [ 36 rows | 28 padding ]                     64        170 ms
two buckets: [ 32 rows ] [ 4 rows ]                       32 + 4    120 ms  <- chosen
"""

from __future__ import annotations


def cheapest_chunks(costs: dict[int, float], num_rows: int) -> list[int]:
    """The buckets, in order, whose sizes cover `num_rows` at the least summed cost; each is
    padded only where it runs past the rows. Ties go to the larger first bucket.

    Args:
        costs: seconds of one step per compiled bucket size.
        num_rows: decode rows to run, >= 1.

    Returns:
        Bucket sizes, first to last.
    """
    # best[r]: (cost, -first size, chunks) for r rows
    best: list[tuple[float, int, list[int]]] = [(0.0, 0, [])]
    for rows in range(1, num_rows + 1):
        best.append(
            min(
                (cost + best[max(0, rows - size)][0], -size, [size, *best[max(0, rows - size)][2]])
                for size, cost in costs.items()
            )
        )
    return best[num_rows][2]
