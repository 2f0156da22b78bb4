"""Messages the engine sends to other systems after processing: enhanced-mode application ACKs.

``appack`` decides and builds them in the workers' transaction (table ``outbound``); ``deliver``
sends them from the listener process, at least once, in order per channel.
"""
