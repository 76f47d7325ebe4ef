"""Task and queue names: the only coupling between the web tier and the workers."""

ANALYZE = "ser.analyze"
# The transcript stage alone, for jobs whose emotions are stored (sent by the reconciler when the
# worker making the transcript died).
TRANSCRIBE = "ser.transcribe"
DELIVER_WEBHOOK = "ser.deliver_webhook"
QUEUE_CPU = "cpu"
QUEUE_GPU = "gpu"
QUEUES = (QUEUE_CPU, QUEUE_GPU)
