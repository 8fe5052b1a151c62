"""Runtime backends: thin I/O shells around the kernel (local asyncio, Redis).

Stage: runtime. Backends read the plan and drive ``flowdsl.kernel``; they
never decide run semantics themselves.
"""
