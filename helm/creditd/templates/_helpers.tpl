{{/*
Names, labels and the pieces shared by the Deployment, the sidecar example
and the migration Job.
*/}}

{{- define "creditd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it contains the chart name. */}}
{{- define "creditd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "creditd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "creditd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "creditd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "creditd.labels" -}}
helm.sh/chart: {{ include "creditd.chart" . }}
{{ include "creditd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: creditd
{{- end }}

{{- define "creditd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "creditd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "creditd.configMapName" -}}
{{- printf "%s-config" (include "creditd.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "creditd.secretName" -}}
{{- default (include "creditd.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "creditd.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "creditd.fullname" .) | trunc 63 | trimSuffix "-") .Values.tls.existingSecret }}
{{- end }}

{{- define "creditd.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* host:port for CREDITD_SERVER__LISTEN; IPv6 hosts are bracketed. */}}
{{- define "creditd.listen" -}}
{{- $host := toString .Values.server.listenAddress }}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) }}
{{- printf "[%s]:%d" $host (int .Values.server.port) }}
{{- else }}
{{- printf "%s:%d" $host (int .Values.server.port) }}
{{- end }}
{{- end }}

{{- define "creditd.listenIsLoopback" -}}
{{- $host := trimAll "[]" (toString .Values.server.listenAddress) }}
{{- if or (hasPrefix "127." $host) (eq $host "::1") (eq $host "localhost") }}true{{ end }}
{{- end }}

{{/* Whole seconds of a creditd duration ("250ms", "10s", "5m", "1h"), rounded up. */}}
{{- define "creditd.durationSeconds" -}}
{{- $d := toString . }}
{{- if not (regexMatch "^[0-9]+(ms|s|m|h)$" $d) }}
{{- fail (printf "%q is not a creditd duration (e.g. 250ms, 10s, 5m, 1h)" $d) }}
{{- end }}
{{- if hasSuffix "ms" $d }}
{{- div (add (trimSuffix "ms" $d | int64) 999) 1000 }}
{{- else if hasSuffix "s" $d }}
{{- trimSuffix "s" $d | int64 }}
{{- else if hasSuffix "m" $d }}
{{- mul (trimSuffix "m" $d | int64) 60 }}
{{- else }}
{{- mul (trimSuffix "h" $d | int64) 3600 }}
{{- end }}
{{- end }}

{{/* A TOML value from a values scalar (YAML numbers arrive as float64). */}}
{{- define "creditd.tomlValue" -}}
{{- if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}
{{- if ne (float64 .) (float64 (int64 .)) }}
{{- fail (printf "config: %v is not an integer" .) }}
{{- end }}
{{- int64 . }}
{{- else }}
{{- fail (printf "config: unsupported value %v (%s)" . (kindOf .)) }}
{{- end }}
{{- end }}

{{/*
creditd.toml: config.* section by section, plus [metrics] from metrics.*, [tls] from tls.* and
redis.cluster when set. postgres.url and redis.url stay out (Secret), and
server.listen comes from CREDITD_SERVER__LISTEN.
*/}}
{{- define "creditd.configToml" -}}
# creditd configuration, rendered by the creditd Helm chart from its values.
# Layered over the defaults embedded in the binary (creditd default-config).
# DATABASE_URL and REDIS_URL come from a Secret; server.listen from
# CREDITD_SERVER__LISTEN.
{{- $config := .Values.config | default dict }}
{{- range $section := list "server" "auth" "postgres" "redis" "hot" "pricing" "commit" "jobs" "reconcile" "alerts" "webhooks" "log" }}
{{- $values := index $config $section | default dict }}
{{- $cluster := and (eq $section "redis") $.Values.redis.cluster }}
{{- if or $values $cluster }}

[{{ $section }}]
{{- range $key := keys $values | sortAlpha }}
{{ $key }} = {{ include "creditd.tomlValue" (index $values $key) }}
{{- end }}
{{- if $cluster }}
cluster = true
{{- end }}
{{- end }}
{{- end }}
{{- range $section := keys $config }}
{{- if not (has $section (list "server" "auth" "postgres" "redis" "hot" "pricing" "commit" "jobs" "reconcile" "alerts" "webhooks" "log")) }}
{{- fail (printf "config.%s: not a section creditd's chart renders (tls comes from tls.*)" $section) }}
{{- end }}
{{- end }}
{{- if .Values.metrics.enabled }}

[metrics]
listen = {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | toJson }}
{{- if .Values.metrics.tenantLabels }}
tenant_labels = true
{{- end }}
{{- end }}
{{- if .Values.tls.enabled }}

[tls]
cert_file = {{ printf "%s/tls.crt" .Values.tls.mountPath | toJson }}
key_file = {{ printf "%s/tls.key" .Values.tls.mountPath | toJson }}
{{- if .Values.tls.mtls }}
client_ca_file = {{ printf "%s/ca.crt" .Values.tls.mountPath | toJson }}
{{- end }}
{{- end }}
{{ end }}

{{/* Fails the render on combinations that cannot work. */}}
{{- define "creditd.validate" -}}
{{- if not (has .Values.mode (list "deployment" "sidecar")) }}
{{- fail (printf "mode must be \"deployment\" or \"sidecar\", not %q" .Values.mode) }}
{{- end }}
{{- $grace := include "creditd.durationSeconds" (dig "server" "shutdown_grace" "10s" .Values.config) | int64 }}
{{- $preStop := .Values.lifecycle.preStopSleepSeconds | int64 }}
{{- if le (.Values.terminationGracePeriodSeconds | int64) (add $grace $preStop) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds (%d) + config.server.shutdown_grace (%ds)" (.Values.terminationGracePeriodSeconds | int64) $preStop $grace) }}
{{- end }}
{{- if and (include "creditd.listenIsLoopback" .) .Values.tls.enabled (or .Values.probes.startup.enabled .Values.probes.readiness.enabled .Values.probes.liveness.enabled) }}
{{- fail "a loopback listener is probed with `creditd health` (plaintext), which cannot speak TLS: disable tls or the probes" }}
{{- end }}
{{- if and (eq .Values.mode "deployment") (include "creditd.listenIsLoopback" .) }}
{{- fail "mode deployment needs server.listenAddress reachable by the Service (0.0.0.0 or ::), not loopback" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (or (not .Values.tls.cert) (not .Values.tls.key)) }}
{{- fail "tls.enabled needs tls.existingSecret or both tls.cert and tls.key" }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.mtls (not .Values.tls.existingSecret) (not .Values.tls.clientCa) }}
{{- fail "tls.mtls needs tls.clientCa (or ca.crt in tls.existingSecret)" }}
{{- end }}
{{- if and (not .Values.secret.existingSecret) (or (not .Values.secret.databaseUrl) (not .Values.secret.redisUrl)) }}
{{- fail "set secret.existingSecret, or both secret.databaseUrl and secret.redisUrl" }}
{{- end }}
{{- end }}

{{/* A kubelet check on the gRPC port: native gRPC, or TCP under TLS or when asked. */}}
{{- define "creditd.probeAction" -}}
{{- $root := index . 0 }}
{{- $type := index . 1 }}
{{- $service := index . 2 }}
{{- if include "creditd.listenIsLoopback" $root }}
{{- /* Kubelet cannot reach a loopback listener; an exec probe runs in the pod. */}}
exec:
  command:
    - /usr/local/bin/creditd
    - health
    - --addr
    - {{ include "creditd.listen" $root | quote }}
    - --service
    - {{ $service | quote }}
{{- else if or $root.Values.tls.enabled (eq $type "tcp") }}
tcpSocket:
  port: grpc
{{- else }}
grpc:
  port: {{ $root.Values.server.port | int }}
  service: {{ $service | quote }}
{{- end }}
{{- end }}

{{/*
The creditd container. Used by the Deployment and by the sidecar example, so
both modes run the same container.
*/}}
{{- define "creditd.container" -}}
{{- $probes := .Values.probes -}}
name: creditd
image: {{ include "creditd.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args:
  - serve
  - --config
  - /etc/creditd/creditd.toml
env:
  # The same file for commands run with kubectl exec (creditd keys ...).
  - name: CREDITD_CONFIG
    value: /etc/creditd/creditd.toml
  - name: CREDITD_SERVER__LISTEN
    value: {{ include "creditd.listen" . | quote }}
  - name: DATABASE_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "creditd.secretName" . }}
        key: {{ .Values.secret.databaseUrlKey }}
  - name: REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ include "creditd.secretName" . }}
        key: {{ .Values.secret.redisUrlKey }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
ports:
  - name: grpc
    containerPort: {{ .Values.server.port | int }}
    protocol: TCP
{{- if .Values.metrics.enabled }}
  - name: metrics
    containerPort: {{ .Values.metrics.port | int }}
    protocol: TCP
{{- end }}
{{- if $probes.startup.enabled }}
startupProbe:
  {{- include "creditd.probeAction" (list . "grpc" $probes.startup.service) | trim | nindent 2 }}
  periodSeconds: {{ $probes.startup.periodSeconds | int }}
  timeoutSeconds: {{ $probes.startup.timeoutSeconds | int }}
  failureThreshold: {{ $probes.startup.failureThreshold | int }}
{{- end }}
{{- if $probes.readiness.enabled }}
readinessProbe:
  {{- include "creditd.probeAction" (list . "grpc" "") | trim | nindent 2 }}
  periodSeconds: {{ $probes.readiness.periodSeconds | int }}
  timeoutSeconds: {{ $probes.readiness.timeoutSeconds | int }}
  failureThreshold: {{ $probes.readiness.failureThreshold | int }}
  successThreshold: {{ $probes.readiness.successThreshold | int }}
{{- end }}
{{- if $probes.liveness.enabled }}
livenessProbe:
  {{- include "creditd.probeAction" (list . $probes.liveness.type $probes.liveness.service) | trim | nindent 2 }}
  periodSeconds: {{ $probes.liveness.periodSeconds | int }}
  timeoutSeconds: {{ $probes.liveness.timeoutSeconds | int }}
  failureThreshold: {{ $probes.liveness.failureThreshold | int }}
{{- end }}
{{- if gt (.Values.lifecycle.preStopSleepSeconds | int) 0 }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ .Values.lifecycle.preStopSleepSeconds | int }}
{{- end }}
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: config
    mountPath: /etc/creditd/creditd.toml
    subPath: creditd.toml
    readOnly: true
{{- if .Values.tls.enabled }}
  - name: tls
    mountPath: {{ .Values.tls.mountPath }}
    readOnly: true
{{- end }}
  - name: tmp
    mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes the creditd container mounts. */}}
{{- define "creditd.volumes" -}}
- name: config
  configMap:
    name: {{ include "creditd.configMapName" . }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "creditd.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by the Deployment and the sidecar example. */}}
{{- define "creditd.podScheduling" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Pod annotations that roll the pods when the config or the chart's Secrets change. */}}
{{- define "creditd.checksums" -}}
checksum/config: {{ include "creditd.configToml" . | sha256sum }}
{{- if not .Values.secret.existingSecret }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
checksum/tls: {{ include (print .Template.BasePath "/tls-secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}
