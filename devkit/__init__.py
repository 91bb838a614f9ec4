"""The development kit beside the `worker` package: what demos, benchmarks and tests need
(local brokers, the Kafka toolkit) and a deployed worker does not. Not shipped in the wheel."""
