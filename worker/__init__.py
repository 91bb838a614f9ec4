"""classify-worker: a streaming classification worker for model routing on Kafka."""

__version__ = "0.1.0"
