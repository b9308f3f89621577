# nginx from Debian's package on the local base image: a stand-in for nginx:1.27-alpine where no image
# registry is reachable (deploy/compose-check.sh). deploy/nginx.conf is mounted over /etc/nginx/nginx.conf.
ARG BASE_IMAGE=prunecascade-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log \
    && (getent group nobody >/dev/null || groupadd --system nobody)
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
