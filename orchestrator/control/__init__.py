"""The control plane on the head: controller, supervisors, scheduler, store, states, failure policy."""
