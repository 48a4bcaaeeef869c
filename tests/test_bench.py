"""The benchmark's clients, against step 2's app in a real server: they read the streams
whole and count every stream that fails, so its tables can be trusted. Its timings are read,
not tested."""

from urllib.parse import urlsplit

import pytest

import stream_server_multiuser as server
from bench import bench
from helpers import free_port

pytestmark = pytest.mark.step(server)


@pytest.fixture
def port(serve) -> int:
    return urlsplit(serve(server.app)).port


def test_concurrent_streams_arrive_whole(port, pauses):
    _, failed = bench.concurrent_streams(port, users=20)
    assert failed == 0
    assert pauses == [1] * 20  # every stream ran: two chunks, one pause of a second


def test_a_stream_cut_short_counts_as_failed(port, drop_connection):
    drop_connection(at_pause=1)  # the first stream to pause breaks; the other four run to the end
    _, failed = bench.concurrent_streams(port, users=5)
    assert failed == 1


def test_a_refused_connection_counts_as_failed():
    _, failed = bench.concurrent_streams(free_port(), users=3)
    assert failed == 3


def test_stream_times_each_chunk(port, pauses):
    sent, arrivals, body = bench.stream(port, "/stream/Timed?count=3&interval=0.1")
    assert len(arrivals) == 3
    assert sent <= arrivals[0] <= arrivals[1] <= arrivals[2]
    assert body.decode().splitlines()[-2] == "chunk 3 of 3 for Timed"


def test_stream_refuses_an_error_response(port):
    with pytest.raises(RuntimeError, match="400"):
        bench.stream(port, "/stream/Timed?count=zero")


def test_fast_read_reads_to_the_final_chunk(port):
    assert bench.fast_read(port, "/stream/Fast?count=1000&interval=0") > 0


def test_the_first_chunk_beside_fast_streams_is_timed(port):
    assert bench.first_chunk_beside_fast_streams(port, fast=2, probes=2) > 0
