"""Benchmarks: the real roomsecrets server against a bare grpc.aio echo of the same service.

`python -m bench.run` (what `make bench` runs) measures GetSecret and SetSecret with ghz in
interleaved rounds; `python -m bench.profile` samples the real server's GetSecret hot path with
py-spy; `python -m bench.ablate` measures what each part of it costs under load (and what
prototyped fixes would save); `python -m bench.hotpath` times each step in-process. See
bench/README.md.
"""
