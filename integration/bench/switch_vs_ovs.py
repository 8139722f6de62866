#!/usr/bin/env python3
"""Driver of switch-vs-ovs.sh (see there): runs testpmd through each switch
and prints a markdown table of packet rates and cycles per packet."""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time

MAC_A = "52:54:00:00:00:0a"
MAC_B = "52:54:00:00:00:0b"
HUGEPAGES = 1536
CLK_TCK = os.sysconf("SC_CLK_TCK")


def clock_hz():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1e6
    raise SystemExit("no cpu MHz in /proc/cpuinfo")


def reserve_hugepages():
    with open("/proc/sys/vm/nr_hugepages") as f:
        have = int(f.read())
    if have < HUGEPAGES:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(HUGEPAGES))
    with open("/proc/mounts") as f:
        mounted = any(line.split()[2] == "hugetlbfs" for line in f)
    if not mounted:
        os.makedirs("/dev/hugepages", exist_ok=True)
        subprocess.run(["mount", "-t", "hugetlbfs", "nodev", "/dev/hugepages"], check=True)


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def context_switches(pids):
    """Context switches so far, over every thread of the processes."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            total += int(line.split()[1])
            except FileNotFoundError:
                pass
    return total


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Testpmd:
    """One testpmd, both ports in flowgen mode, lcores on CPU 0; collects
    the per-second received-packet rates it prints."""

    def __init__(self, sockets, size, prefix, server):
        extra = ",server=1" if server else ""
        vdevs = [
            f"--vdev=net_virtio_user{i},path={path},queues=1,queue_size=1024,mac={mac}{extra}"
            for i, (path, mac) in enumerate(zip(sockets, [MAC_A, MAC_B]))
        ]
        args = [
            "dpdk-testpmd", "--no-pci", "--single-file-segments", "-m", "256",
            "--file-prefix", prefix, "--lcores", "0@0,1@0", *vdevs, "--",
            "--forward-mode=flowgen", f"--eth-peer=0,{MAC_B}", f"--eth-peer=1,{MAC_A}",
            "--nb-cores=1", "--total-num-mbufs=32768", f"--txpkts={size}", "--stats-period=1",
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace")
        self.samples = []  # (time, port, rx_pps)
        self.text = []
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.text.append(line)
            found = re.search(r"NIC statistics for port (\d+)", line)
            if found:
                self.port = int(found.group(1))
            found = re.search(r"Rx-pps:\s+(\d+)", line)
            if found and self.port is not None:
                self.samples.append((time.monotonic(), self.port, int(found.group(1))))

    def wait_for_traffic(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pps > 0 for (_, _, pps) in self.samples[-4:]):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError("no traffic through the switch; testpmd said:\n" + "".join(self.text[-40:]))

    def rate(self, start, end):
        """Mean received packets per second (both ports) over [start, end]."""
        by_second = {}
        for (at, port, pps) in self.samples:
            if start <= at <= end:
                by_second.setdefault(round(at), {})[port] = pps
        totals = [sum(ports.values()) for ports in by_second.values() if len(ports) == 2]
        if not totals:
            raise RuntimeError("no samples in the window")
        return statistics.mean(totals)

    def stop(self):
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(testpmd, pids, seconds, hz, drops=None):
    """Rates over `seconds` after a warm-up; with `drops` (a function
    giving the switch's drop counters by reason), the drops in that window."""
    testpmd.wait_for_traffic()
    time.sleep(2)
    drops0 = drops() if drops else {}
    start, cpu0, switches0 = time.monotonic(), cpu_seconds(pids), context_switches(pids)
    time.sleep(seconds)
    end, cpu1, switches1 = time.monotonic(), cpu_seconds(pids), context_switches(pids)
    drops1 = drops() if drops else {}
    pps = testpmd.rate(start + 0.5, end)
    cpu = (cpu1 - cpu0) / (end - start)
    result = {"pps": pps, "cpu": cpu, "cycles_per_packet": cpu * hz / pps if pps else None,
              "context_switches_per_second": (switches1 - switches0) / (end - start)}
    if drops:
        result["drops"] = {reason: count - drops0.get(reason, 0)
                           for reason, count in drops1.items() if count - drops0.get(reason, 0)}
    return result


def line_round_trip(binaries):
    """Nanoseconds for a cache line to go from CPU 0 to CPU 1 and back,
    measured just before a run: on a virtual machine it depends on where
    the host put the two virtual CPUs, and it can change between runs."""
    out = subprocess.run([f"{binaries}/linebounce"], check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def port_drops(listing):
    """Drops by reason, summed over the ports (or tunnels) of a listing."""
    drops = {}

    def walk(value):
        if isinstance(value, dict):
            counters = value.get("counters")
            if isinstance(counters, dict):
                for reason, count in counters.get("drops", {}).items():
                    if count:
                        drops[reason] = drops.get(reason, 0) + count
            for inner in value.values():
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    walk(listing)
    return drops


def fabric_run(binaries, size, seconds, hz, nodes):
    root = tempfile.mkdtemp(prefix="switchbench-")
    daemons = []
    try:
        apis = []
        for n in range(nodes):
            d = os.path.join(root, f"n{n + 1}")
            os.makedirs(d)
            api_tcp = f"127.0.0.1:{free_udp_port()}"
            log = open(os.path.join(d, "log"), "w")
            args = ["taskset", "-c", "1", f"{binaries}/fabricd", "--data-dir", f"{d}/data",
                    "--api-socket", f"{d}/api.sock", "--socket-dir", f"{d}/vhost",
                    "--cluster-listen", f"127.0.0.1:{free_udp_port()}", "--api-tcp", api_tcp,
                    "--node-name", f"n{n + 1}"]
            daemons.append(subprocess.Popen(args, stdout=log, stderr=log))
            apis.append((f"{d}/api.sock", api_tcp))
        fabctl = lambda n, *a: subprocess.run(
            [f"{binaries}/fabctl", "--api", apis[n][0], *a], check=True, capture_output=True, text=True
        ).stdout
        for n in range(nodes):
            for _ in range(100):
                if subprocess.run([f"{binaries}/fabctl", "--api", apis[n][0], "status"],
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        fabctl(0, "cluster", "init")
        for n in range(1, nodes):
            token = fabctl(0, "cluster", "token").strip()
            fabctl(n, "cluster", "join", apis[0][1], "--token", token)
        fabctl(0, "switch", "segment", "create", "bench")
        sockets = []
        for i, (name, mac) in enumerate([("a", MAC_A), ("b", MAC_B)]):
            node = f"n{min(i, nodes - 1) + 1}"
            port = json.loads(fabctl(0, "-o", "json", "switch", "port", "add", "bench", "--mac", mac,
                                     "--name", name, "--no-port-security", "--node", node))
            sockets.append(port["socket"])
        # The tunnel connects within a second of the ports' creation.
        time.sleep(2 if nodes > 1 else 0)
        testpmd = Testpmd(sockets, size, f"fabbench{os.getpid()}", server=False)
        def drops():
            total = {}
            for n in range(nodes):
                listings = [json.loads(fabctl(n, "-o", "json", "switch", "port", "list"))]
                if nodes > 1:
                    # Frames dropped on their way into a tunnel count too.
                    listings.append(json.loads(fabctl(n, "-o", "json", "switch", "tunnel", "list")))
                for listing in listings:
                    for reason, count in port_drops(listing).items():
                        total[reason] = total.get(reason, 0) + count
            return total

        try:
            return measure(testpmd, [d.pid for d in daemons], seconds, hz, drops)
        finally:
            testpmd.stop()
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            try:
                d.wait(timeout=10)
            except subprocess.TimeoutExpired:
                d.kill()
        shutil.rmtree(root, ignore_errors=True)


def ovs_run(size, seconds, hz, flows):
    root = tempfile.mkdtemp(prefix="ovsbench-")
    env = dict(os.environ, OVS_RUNDIR=root, OVS_LOGDIR=root, OVS_DBDIR=root)
    db = f"unix:{root}/db.sock"
    run = lambda *a: subprocess.run(list(a), check=True, env=env, capture_output=True, text=True)
    vsctl = lambda *a: run("ovs-vsctl", f"--db={db}", "--timeout=30", *a)
    try:
        run("ovsdb-tool", "create", f"{root}/conf.db", "/usr/share/openvswitch/vswitch.ovsschema")
        run("ovsdb-server", f"--remote=punix:{root}/db.sock", f"--pidfile={root}/ovsdb.pid",
            "--detach", f"--log-file={root}/ovsdb.log", f"{root}/conf.db")
        vsctl("--no-wait", "init")
        vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:dpdk-init=true",
              "other_config:dpdk-lcore-mask=0x2", "other_config:pmd-cpu-mask=0x2",
              "other_config:dpdk-socket-mem=1024",
              f"other_config:dpdk-extra=--no-pci --file-prefix=ovsbench{os.getpid()}")
        run("taskset", "-c", "1", "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk", db,
            f"--pidfile={root}/vswitchd.pid", "--detach", f"--log-file={root}/vswitchd.log")
        vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev")
        sockets = []
        for port in ["p0", "p1"]:
            path = f"{root}/{port}.sock"
            vsctl("add-port", "br0", port, "--", "set", "Interface", port,
                  "type=dpdkvhostuserclient", f"options:vhost-server-path={path}")
            sockets.append(path)
        if flows:
            run("ovs-ofctl", "del-flows", "br0")
            run("ovs-ofctl", "add-flow", "br0", "in_port=p0,actions=output:p1")
            run("ovs-ofctl", "add-flow", "br0", "in_port=p1,actions=output:p0")
        with open(f"{root}/vswitchd.pid") as f:
            pid = int(f.read())
        testpmd = Testpmd(sockets, size, f"ovstp{os.getpid()}", server=True)
        try:
            return measure(testpmd, [pid], seconds, hz)
        finally:
            testpmd.stop()
    finally:
        for name in ["vswitchd", "ovsdb"]:
            try:
                with open(f"{root}/{name}.pid") as f:
                    pid = int(f.read())
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
            except (OSError, ValueError):
                pass
        shutil.rmtree(root, ignore_errors=True)


def bridge_run(seconds):
    """A Linux bridge between two veth pairs, each end in a namespace made
    for the run: iperf3 TCP Gbit/s and UDP 64-byte-frame packets/s."""
    tag = f"fb{os.getpid() % 100000}"
    ns = [f"{tag}a", f"{tag}b", f"{tag}br"]
    sh = lambda *a: subprocess.run(list(a), check=True, capture_output=True, text=True)
    try:
        for n in ns:
            sh("ip", "netns", "add", n)
        sh("ip", "-n", ns[2], "link", "add", "br0", "type", "bridge")
        for i, (n, addr) in enumerate([(ns[0], "10.77.0.1/24"), (ns[1], "10.77.0.2/24")]):
            sh("ip", "link", "add", f"{tag}v{i}", "netns", n, "type", "veth", "peer", "name",
               f"{tag}p{i}", "netns", ns[2])
            sh("ip", "-n", ns[2], "link", "set", f"{tag}p{i}", "master", "br0", "up")
            sh("ip", "-n", n, "addr", "add", addr, "dev", f"{tag}v{i}")
            sh("ip", "-n", n, "link", "set", f"{tag}v{i}", "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "-n", ns[2], "link", "set", "br0", "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns[0], "iperf3", "-s", "-1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        tcp = json.loads(sh("ip", "netns", "exec", ns[1], "iperf3", "-c", "10.77.0.1", "-t",
                            str(seconds), "-J").stdout)
        server.wait(timeout=10)
        server = subprocess.Popen(["ip", "netns", "exec", ns[0], "iperf3", "-s", "-1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        # 18-byte UDP payloads: 64-byte Ethernet frames with the FCS.
        udp = json.loads(sh("ip", "netns", "exec", ns[1], "iperf3", "-c", "10.77.0.1", "-u",
                            "-l", "18", "-b", "0", "-t", str(seconds), "-J").stdout)
        server.wait(timeout=10)
        received = udp["end"]["sum"]
        lost = received.get("lost_packets", 0)
        pps = (received["packets"] - lost) / received["seconds"]
        return {"tcp_gbps": tcp["end"]["sum_received"]["bits_per_second"] / 1e9, "udp64_pps": pps}
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def cell(values, scale=1.0, digits=2):
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--sizes", default="64,1500")
    parser.add_argument("--json", default="")
    parser.add_argument("--bridge", default="true")
    parser.add_argument("--bin", required=True)
    parser.add_argument("--targets", default="fabric,fabric-2-nodes,ovs-normal,ovs-flows")
    args = parser.parse_args()
    hz = clock_hz()
    reserve_hugepages()
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = {
        "fabric": lambda size: fabric_run(args.bin, size, args.seconds, hz, 1),
        "fabric-2-nodes": lambda size: fabric_run(args.bin, size, args.seconds, hz, 2),
        "ovs-normal": lambda size: ovs_run(size, args.seconds, hz, flows=False),
        "ovs-flows": lambda size: ovs_run(size, args.seconds, hz, flows=True),
    }
    wanted = args.targets.split(",")
    targets = {name: run for name, run in targets.items() if name in wanted}
    results = {name: {size: [] for size in sizes} for name in targets}
    for run in range(args.runs):
        for size in sizes:
            for name, target in targets.items():
                round_trip = line_round_trip(args.bin)
                result = target(size)
                result["line_round_trip_ns"] = round_trip
                print(f"run {run + 1} {name} {size} B: {result['pps'] / 1e6:.3f} Mpps, "
                      f"switch CPU {result['cpu']:.2f}, "
                      f"{result['cycles_per_packet'] or 0:.0f} cycles/packet, "
                      f"{result['context_switches_per_second']:.0f} context switches/s, "
                      f"line round trip {round_trip:.0f} ns"
                      + (f", drops {result['drops']}" if "drops" in result else ""), flush=True)
                results[name][size].append(result)
    bridge = []
    if args.bridge == "true":
        for run in range(args.runs):
            bridge.append(bridge_run(args.seconds))
            print(f"run {run + 1} linux bridge: {bridge[-1]}", flush=True)

    print()
    print(f"clock {hz / 1e6:.0f} MHz; {args.runs} runs x {args.seconds} s; median (min–max)")
    print()
    print("| switch | frame | Mpps (both ports) | Gbit/s | switch CPU (cores) | cycles/packet "
          "| CPU 0-1 line round trip (ns) |")
    print("|---|---|---|---|---|---|---|")
    for name in targets:
        for size in sizes:
            rs = results[name][size]
            print(f"| {name} | {size} B | {cell([r['pps'] for r in rs], 1e-6, 3)} | "
                  f"{cell([r['pps'] * size * 8 for r in rs], 1e-9)} | "
                  f"{cell([r['cpu'] for r in rs])} | {cell([r['cycles_per_packet'] for r in rs], 1, 0)} | "
                  f"{cell([r['line_round_trip_ns'] for r in rs], 1, 0)} |")
    print()
    print("| ratio, fabric / peer (medians) | frame | Mpps | cycles/packet |")
    print("|---|---|---|---|")
    for peer in [p for p in ["ovs-normal", "ovs-flows"] if p in targets and "fabric" in targets]:
        for size in sizes:
            f = results["fabric"][size]
            p = results[peer][size]
            mpps = statistics.median(r["pps"] for r in f) / statistics.median(r["pps"] for r in p)
            cycles = (statistics.median(r["cycles_per_packet"] for r in f)
                      / statistics.median(r["cycles_per_packet"] for r in p))
            print(f"| {peer} | {size} B | {mpps:.2f}x | {cycles:.2f}x |")
    if bridge:
        print()
        print("| Linux bridge, veth pairs in namespaces (iperf3) | value |")
        print("|---|---|")
        print(f"| TCP Gbit/s | {cell([b['tcp_gbps'] for b in bridge])} |")
        print(f"| UDP 64 B frames, Mpps received | {cell([b['udp64_pps'] for b in bridge], 1e-6, 3)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clock_hz": hz, "results": results, "bridge": bridge}, f, indent=1)


if __name__ == "__main__":
    main()
