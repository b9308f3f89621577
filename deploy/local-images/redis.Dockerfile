# Redis from Debian's package on the local base image: a stand-in for redis:7.4-alpine where no image registry
# is reachable (deploy/compose-check.sh). The compose file passes the whole command line.
ARG BASE_IMAGE=prunecascade-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--dir", "/data", "--protected-mode", "no"]
