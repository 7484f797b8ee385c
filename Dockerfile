# syntax=docker/dockerfile:1

# ---- build ----
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked \
 && cp target/release/claude-worker /usr/local/bin/claude-worker

# ---- runtime: Node.js for the Claude Code CLI, plus the worker ----
FROM node:22-bookworm-slim

# The CLI version the tests pin.
ARG CLAUDE_CODE_VERSION=2.1.330
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git \
 && rm -rf /var/lib/apt/lists/* \
 && npm install -g --no-audit --no-fund @anthropic-ai/claude-code@${CLAUDE_CODE_VERSION} \
 && npm cache clean --force

# Turns run as an unprivileged user. Its home holds the CLI's state
# (~/.claude, session transcripts), the working directory the workspaces
# (profiles default to ./workspaces/<profile>).
RUN useradd --create-home --home-dir /home/claude --uid 10001 --shell /bin/bash claude \
 && mkdir -p /home/claude/workspaces /home/claude/.claude \
 && chown -R claude:claude /home/claude
ENV HOME=/home/claude
WORKDIR /home/claude

COPY --from=builder /usr/local/bin/claude-worker /usr/local/bin/claude-worker

USER claude
ENTRYPOINT ["claude-worker"]
CMD ["worker"]
