"""Task and queue names: the only coupling between the web tier and the workers."""

ANALYZE = "ser.analyze"
DELIVER_WEBHOOK = "ser.deliver_webhook"
QUEUE_CPU = "cpu"
QUEUE_GPU = "gpu"
QUEUES = (QUEUE_CPU, QUEUE_GPU)
