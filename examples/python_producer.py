#!/usr/bin/env python3
"""A claude-worker producer in Python (pika): publish one prompt job, print
the streamed reply, exit with the job's outcome.

    pip install pika
    python examples/python_producer.py "Say hello." --session demo:alice

Exit codes: 0 completed, 1 failed, 3 cancelled, 4 no event within --timeout
(is a worker running?), 2 usage. The protocol is in docs/protocol.md.
"""

import argparse
import json
import sys
import uuid

try:
    import pika
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("this example needs pika: pip install pika")

TERMINAL = ("completed", "failed", "cancelled")
EXIT = {"completed": 0, "failed": 1, "cancelled": 3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--session", default="python:example", help="session key (the conversation)")
    ap.add_argument("--prefix", default="claude", help="amqp.prefix of the workers")
    ap.add_argument("--amqp-url", default="amqp://guest:guest@localhost:5672/%2f")
    ap.add_argument("--routing-key", default="prompt", help="amqp.jobs_routing_key of the workers")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for each event")
    args = ap.parse_args()

    conn = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()  # basic_publish raises if the broker did not take the job

    # 1. A private queue for our events, bound BEFORE the job is published
    #    (a topic exchange drops what no queue is bound for).
    reply_key = "py." + uuid.uuid4().hex
    queue = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(queue=queue, exchange=f"{args.prefix}.replies", routing_key=reply_key)

    # 2. The job. The same job_id may be published again safely (a job id
    #    runs once; a finished one answers with its terminal event again).
    job_id = str(uuid.uuid4())
    job = {"v": 1, "job_id": job_id, "session_key": args.session, "prompt": args.prompt}
    try:
        ch.basic_publish(
            exchange=f"{args.prefix}.jobs",
            routing_key=args.routing_key,
            body=json.dumps(job),
            properties=pika.BasicProperties(
                content_type="application/json",
                message_id=job_id,
                reply_to=reply_key,
                delivery_mode=2,
            ),
            mandatory=True,
        )
    except pika.exceptions.UnroutableError:
        print(
            f"no queue takes jobs on {args.prefix}.jobs/{args.routing_key}: start a worker first "
            "(claude-worker worker)",
            file=sys.stderr,
        )
        return 4

    # 3. Events until the terminal one, by the protocol's reader rule: drop
    #    duplicate seqs and events of an older lease epoch than one already
    #    seen (a paused worker speaking after its successor); discard the
    #    text of an attempt that is retried.
    seen = set()
    max_epoch = None
    text = []  # the current attempt's text
    for _method, props, body in ch.consume(queue, auto_ack=True, inactivity_timeout=args.timeout):
        if body is None:
            print(f"\nno event for {args.timeout:.0f} s (is a worker running?)", file=sys.stderr)
            return 4
        ev = json.loads(body)
        epoch = (props.headers or {}).get("x-lease-epoch")
        if ev.get("job_id") != job_id or ev["seq"] in seen:
            continue
        if epoch is not None and max_epoch is not None and epoch < max_epoch:
            continue
        seen.add(ev["seq"])
        if epoch is not None:
            max_epoch = epoch if max_epoch is None else max(max_epoch, epoch)
        kind = ev["type"]
        if kind == "text":
            text.append(ev["text"])
            print(ev["text"], end="", flush=True)
        elif kind == "tool_use":
            print(f"\n[{ev['name']}: {ev['input_summary']}]", flush=True)
        elif kind == "retrying":
            if text:
                print("\n[the partial answer above is discarded]", file=sys.stderr)
            text = []
            print(f"[retrying: {ev['reason']}]", file=sys.stderr)
        elif kind in TERMINAL:
            if text:
                print()
            if kind == "completed":
                print(
                    f"[completed: {ev['num_turns']} turn(s), {ev['duration_ms']} ms, "
                    f"${ev['total_cost_usd']:.4f}]",
                    file=sys.stderr,
                )
            elif kind == "failed":
                print(f"[failed ({ev['error']}): {ev['message']}]", file=sys.stderr)
            else:
                print(f"[cancelled: {ev['reason']}]", file=sys.stderr)
            ch.cancel()
            conn.close()
            return EXIT[kind]
    return 4


if __name__ == "__main__":
    sys.exit(main())
