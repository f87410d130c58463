"""Telemetry sources: each turns a cluster's view (Kafka, Kubernetes watches, the simulated
fleet) into the update values of `fleetd.sources.updates` and hands them to the state owner."""
