"""Load tests and serving benchmarks (the ``bench`` extra: ``pip install 'ctrserve[bench]'``).

- ``load``: the load generator, closed loop and Poisson open loop, over ``rawhttp``'s minimal
  keep-alive client or aiohttp's; ``payloads``: request bodies of every API from a package;
- ``servers``: the server launcher (free loopback port, pinned with ``taskset``, ready wait,
  CPU and memory of the process group, stop by process group), for the service, the
  ``parse_only`` app and a server that does no work (nginx or ``null_server``);
- ``driver`` with ``options``, ``report`` and ``profiles``: ``ctrserve bench serve``;
  ``extra`` checks the bench extra before it runs;
- ``peers`` with ``peer_options``, ``peer_report``, ``peer_venvs`` and the peers' own server
  code in ``peer_servers``: ``ctrserve bench peers``, the service beside a naive FastAPI
  endpoint, MLServer and BentoML;
- ``ceiling``, ``decode_cost``: in-process costs (the session, the transform, JSON decoding);
- ``overload``: twice the capacity for a minute (``docs/reliability.md``); ``memory_scale``:
  packages at Criteo's real table sizes;
- ``locustfile``: a locust mix, an outside client that checks the answers.
"""
