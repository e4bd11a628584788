"""Bounded memory: the server's resident memory does not grow over 20 epochs."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import open_client, process_tree_rss_mb

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def test_server_rss_is_flat_over_20_epochs(cluster) -> None:
    server = cluster.start("--cache-batches", "4")
    samples: list[float] = []
    main_rss: list[float] = []
    with open_client(server.data, batch_size=16, image_size=224) as batches:
        for epoch in range(20):
            for _ in batches:
                pass
            samples.append(process_tree_rss_mb(server.process.pid))
            main_rss.append(process_tree_rss_mb(server.process.pid, "Rss") if epoch in (0, 19) else 0.0)
    warm, final = samples[2], samples[-1]
    print(f"server PSS (main + forkserver + workers) after epochs 1..20, MB: {[round(s, 1) for s in samples]}")
    print(f"summed RSS after epoch 1 and 20, MB: {main_rss[0]:.1f} {main_rss[-1]:.1f}")
    assert final - warm < 25.0, f"RSS grew from {warm:.1f} MB (epoch 3) to {final:.1f} MB (epoch 20)"
    assert max(samples[2:]) - min(samples[2:]) < 40.0
