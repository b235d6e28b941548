"""The lorabus worker process: Kafka I/O, control events, CLI and metrics, on top of `scheduler.Engine`."""
