"""scheduler_service: request queues, KV block accounting, the policies and the engine loop; never tensors."""
