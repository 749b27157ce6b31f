"""The single-machine stack: the embedded Kafka-protocol broker, Alertmanager and the demo that runs them."""
