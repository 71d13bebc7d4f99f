# The node image: the same environment as scripts/install_locked.sh makes on a bare node, baked in,
# so a spot replacement joins in minutes.  Build it for one pinned commit and push it to a registry
# the nodes can pull from (docs/cluster.md, "A node image"):
#   docker build --build-arg VARIANT=cuda -t ECR_REPO/sslrobust:$(git rev-parse HEAD) .
# The CUDA variant needs only the NVIDIA driver (>= 580.65.06, CUDA 13.0) and the NVIDIA container
# toolkit on the host: torch's wheels carry the CUDA runtime.
FROM ubuntu:22.04
ARG VARIANT=cuda
ENV DEBIAN_FRONTEND=noninteractive
# Ray's launcher runs commands in the container through bash and syncs files with rsync.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      ca-certificates curl git openssh-client rsync sudo tmux sqlite3 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd -m -s /bin/bash ubuntu && echo 'ubuntu ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/ubuntu
USER ubuntu
WORKDIR /home/ubuntu/sslrobust
COPY --chown=ubuntu:ubuntu . .
RUN bash scripts/install_locked.sh "$VARIANT" /home/ubuntu/sslrobust-venv
ENV PATH=/home/ubuntu/sslrobust-venv/bin:/home/ubuntu/.local/bin:$PATH \
    SSLROBUST_STUDIES_DIR=/home/ubuntu/sslrobust/studies
