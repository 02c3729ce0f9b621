"""Summarises a three-way bench (ringproxy, HAProxy, NGINX): rows of
`round workload target value rate` in, a markdown table of medians (min-max) and per-round
ratios (CPU and rate) out. Used by bench/tls.sh and bench/tls_origin.sh."""
import statistics, sys
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
data = {}
for round_, workload, target, value, rate in rows:
    if value == "nan":
        continue
    data.setdefault(workload, {}).setdefault(target, {})[round_] = (float(value), float(rate))
print("| workload | ringproxy cpu | haproxy cpu | nginx cpu | rp/hap cpu | rp/ngx cpu | ringproxy rate | haproxy rate | nginx rate | rp/hap rate | rp/ngx rate |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
def cell(values):
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})" if values else "-"
for workload, per in data.items():
    cpu = {t: [v[0] for v in per.get(t, {}).values()] for t in ("rp", "hap", "ngx")}
    rate = {t: [v[1] for v in per.get(t, {}).values()] for t in ("rp", "hap", "ngx")}
    def ratio(other, column=0):
        paired = [per["rp"][r][column] / per[other][r][column] for r in per.get("rp", {})
                  if r in per.get(other, {}) and per[other][r][column] > 0]
        return f"{statistics.median(paired):.3f}" if paired else "-"
    print(f"| {workload} | {cell(cpu['rp'])} | {cell(cpu['hap'])} | {cell(cpu['ngx'])} | {ratio('hap')} | {ratio('ngx')} | "
          f"{cell(rate['rp'])} | {cell(rate['hap'])} | {cell(rate['ngx'])} | {ratio('hap', 1)} | {ratio('ngx', 1)} |")
