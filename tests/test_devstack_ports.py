"""The local S3 endpoint's ports: weed mini refuses a port that is another of its listeners' gRPC twin (+10000),
and parallel test processes may take a port between the check and weed's bind. Either once killed a whole xdist
process's session fixture (313 errors in one run)."""

from __future__ import annotations

from devtools import devstack

NAMES = ("master", "volume", "filer", "iceberg", "lance", "webdav", "admin", "s3")


def test_no_port_is_another_ones_grpc_twin():
    for _ in range(500):
        ports = devstack.free_ports(NAMES, fixed={"s3": 30000})
        every = list(ports.values()) + [p + 10000 for p in ports.values()]
        assert len(set(every)) == len(every), ports
        assert ports["s3"] == 30000 and set(ports) == set(NAMES)


def test_weed_refusing_its_ports_is_started_again_on_new_ones(monkeypatch):
    """The first draw gives webdav the master's gRPC port (weed exits: "reserved for gRPC calculation"); the
    endpoint still comes up, on the second draw."""
    real = devstack.free_ports
    draws = []

    def clashing_once(names, *, fixed=None):
        ports = real(names, fixed=fixed)
        if not draws:
            ports["webdav"] = ports["master"] + 10000
        draws.append(ports)
        return ports

    monkeypatch.setattr(devstack, "free_ports", clashing_once)
    server = devstack.start_seaweedfs(bucket="port-retry")
    try:
        assert len(draws) == 2 and server.ports == draws[1]  # a second draw only follows a port refusal
        server.client().put_object(Bucket="port-retry", Key="k", Body=b"v")
        assert server.client().get_object(Bucket="port-retry", Key="k")["Body"].read() == b"v"
    finally:
        server.stop()
