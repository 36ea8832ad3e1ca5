#!/usr/bin/env bash
# A throwaway CA and one certificate/key pair for the scheduler, the workers and the clients.
# Good for tests and private clusters; use your site's CA for anything shared.
#
#   cluster/tls/make-test-ca.sh OUT_DIR [DAYS]
#   -> OUT_DIR/ca.pem (give to everyone), OUT_DIR/dask.pem + OUT_DIR/dask.key (keep private, mode 600),
#      OUT_DIR/ca.key (only needed to issue more certificates: keep it off the cluster)
#
# Dask checks that a peer's certificate chains to ca.pem, in both directions, and ignores host names,
# so one certificate serves every node.
set -euo pipefail

OUT=${1:?usage: make-test-ca.sh OUT_DIR [DAYS]}
DAYS=${2:-365}
mkdir -p "$OUT"
umask 077

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$DAYS" \
  -subj "/CN=l2l-dask-test-ca" -keyout "$OUT/ca.key" -out "$OUT/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=l2l-dask" -keyout "$OUT/dask.key" -out "$OUT/dask.csr" 2>/dev/null
printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature" \
  "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$OUT/dask.ext"
openssl x509 -req -in "$OUT/dask.csr" -CA "$OUT/ca.pem" -CAkey "$OUT/ca.key" -CAcreateserial \
  -days "$DAYS" -extfile "$OUT/dask.ext" -out "$OUT/dask.pem" 2>/dev/null
rm -f "$OUT/dask.csr" "$OUT/dask.ext" "$OUT/ca.srl"
chmod 644 "$OUT/ca.pem" "$OUT/dask.pem"
openssl verify -CAfile "$OUT/ca.pem" "$OUT/dask.pem"
