#!/usr/bin/env python3
"""Draws a soak's samples (the CSV `ampora-loadtest soak --csv-out` writes) as a PNG:
server RSS by role on top, open descriptors and live agent connections below, with the
pushes and a coordinator restart marked. Needs matplotlib (pip install matplotlib).

    plot-soak.py SAMPLES.csv OUT.png [TITLE] [--restart-at SECS]
"""
import csv
import sys


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    restart = None
    if "--restart-at" in argv:
        restart = float(argv[argv.index("--restart-at") + 1])
        args.remove(argv[argv.index("--restart-at") + 1])
    if len(args) < 2:
        sys.exit(__doc__)
    src, out = args[0], args[1]
    title = args[2] if len(args) > 2 else src
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(src)))
    if not rows:
        sys.exit(f"{src}: no samples")
    minutes = [float(r["t_secs"]) / 60 for r in rows]
    col = lambda k: [float(r[k]) for r in rows]
    mib = lambda k: [v / 1024 for v in col(k)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(minutes, mib("rss_kib"), label="all server processes")
    if any(col("gateway_rss_kib")):
        top.plot(minutes, mib("gateway_rss_kib"), label="gateways")
        top.plot(minutes, mib("coordinator_rss_kib"), label="coordinators")
    top.set_ylabel("RSS (MiB)")
    top.set_ylim(0, max(mib("rss_kib")) * 1.1)
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    top.set_title(title)
    bottom.plot(minutes, col("fds"), label="server open descriptors")
    bottom.plot(minutes, col("live_agents"), label="agents connected (client side)")
    bottom.set_ylabel("count")
    bottom.set_ylim(0, max(col("fds") + col("live_agents")) * 1.1)
    bottom.set_xlabel("minutes")
    bottom.grid(alpha=0.3)
    pushes = col("pushes")
    for i in range(1, len(rows)):
        if pushes[i] > pushes[i - 1]:
            for ax in (top, bottom):
                ax.axvline(minutes[i], color="grey", alpha=0.15, lw=0.8)
    if restart is not None:
        for ax in (top, bottom):
            ax.axvline(restart / 60, color="red", lw=1.2, label="coordinator restart")
    bottom.legend(loc="lower right")
    top.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(sys.argv)
