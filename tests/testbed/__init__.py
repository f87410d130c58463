"""The fleetd test bed: real Kafka and two real Kubernetes control planes on 127.0.0.1.

- :mod:`tests.testbed.build` builds (or reuses from ``~/.cache/fleetd-testbed``) the Kafka
  jars, etcd, kube-apiserver, kube-scheduler and kwok.
- :mod:`tests.testbed.procs` starts processes in their own process groups and kills them all.
- :mod:`tests.testbed.kafka` runs a single KRaft broker; :mod:`tests.testbed.kube` runs
  etcd + kube-apiserver + kwok (+ kube-scheduler) per cluster and creates fake GPU nodes.
- ``tests/integration/conftest.py`` turns these into session fixtures.

Nothing here is imported by fleetd itself.
"""
