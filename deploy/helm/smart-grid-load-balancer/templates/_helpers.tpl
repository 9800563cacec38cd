{{/* Names, labels and the pieces every workload shares. */}}

{{- define "sglb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's prefix of every object name: short enough for "<prefix>-substation-1-0" to stay a DNS label. */}}
{{- define "sglb.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" -}}
{{- else if contains (include "sglb.name" .) .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "sglb.name" .) | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sglb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sglb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sglb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sglb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: smart-grid-load-balancer
{{- end -}}

{{/* Object names of the components. */}}
{{- define "sglb.chargeApi" -}}{{ include "sglb.fullname" . }}-charge-api{{- end -}}
{{- /* chargeApi.replicaCount, or when it is empty: 1 on SQLite (one writer of its file), 2 on a shared PostgreSQL. */ -}}
{{- define "sglb.chargeApiReplicas" -}}
{{- if kindIs "invalid" .Values.chargeApi.replicaCount -}}{{ ternary 1 2 (eq .Values.database.type "sqlite") }}{{- else -}}{{ .Values.chargeApi.replicaCount }}{{- end -}}
{{- end -}}
{{- define "sglb.loadBalancer" -}}{{ include "sglb.fullname" . }}-load-balancer{{- end -}}
{{- define "sglb.gateway" -}}{{ include "sglb.fullname" . }}-gateway{{- end -}}
{{- define "sglb.secret" -}}{{ include "sglb.fullname" . }}-secrets{{- end -}}
{{- define "sglb.database" -}}{{ include "sglb.fullname" . }}-db{{- end -}}

{{/* A substation's StatefulSet and headless Service name; call with (dict "root" $ "substation" .). */}}
{{- define "sglb.substation" -}}{{ include "sglb.fullname" .root }}-{{ .substation.id }}{{- end -}}

{{/* The stable URL of a substation: its pod's name under its headless Service. */}}
{{- define "sglb.substationUrl" -}}
{{- $name := include "sglb.substation" . -}}
http://{{ $name }}-0.{{ $name }}.{{ .root.Release.Namespace }}.svc:{{ .substation.port }}
{{- end -}}

{{- define "sglb.substationUrls" -}}
{{- $root := . -}}
{{- $urls := list -}}
{{- range .Values.substations.list -}}
{{- $urls = append $urls (include "sglb.substationUrl" (dict "root" $root "substation" .)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{- define "sglb.image" -}}
image: {{ printf "%s:%s" .repository .tag | quote }}
imagePullPolicy: {{ .pullPolicy }}
{{- end -}}

{{/* The Secret (name and key) of ADMIN_TOKEN and of PEER_KEY: the user's, or the chart's. */}}
{{- define "sglb.adminTokenRef" -}}
secretKeyRef:
  name: {{ .Values.adminToken.existingSecret | default (include "sglb.secret" .) }}
  key: {{ if .Values.adminToken.existingSecret }}{{ .Values.adminToken.existingSecretKey }}{{ else }}ADMIN_TOKEN{{ end }}
{{- end -}}

{{- define "sglb.peerKeyRef" -}}
secretKeyRef:
  name: {{ .Values.peerKey.existingSecret | default (include "sglb.secret" .) }}
  key: {{ if .Values.peerKey.existingSecret }}{{ .Values.peerKey.existingSecretKey }}{{ else }}PEER_KEY{{ end }}
{{- end -}}

{{/* Environment every service shares: the log level and, when enabled, the operators' token. */}}
{{- define "sglb.commonEnv" -}}
- name: LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- if .Values.adminToken.enabled }}
- name: ADMIN_TOKEN
  valueFrom:
    {{- include "sglb.adminTokenRef" . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* A map of plain settings as env entries, sorted by name. */}}
{{- define "sglb.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{- define "sglb.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "sglb.containerSecurity" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* Probes on a service's /health; "port" is the container port's name. */}}
{{- define "sglb.probes" -}}
readinessProbe:
  httpGet:
    path: /health
    port: {{ . }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
livenessProbe:
  httpGet:
    path: /health
    port: {{ . }}
  initialDelaySeconds: 15
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{/* The read-only root filesystem's one writable place: /tmp, where the nginx edge writes its config,
pid file and gunicorn's socket (EDGE_RUN_DIR, a fresh folder per start) and gunicorn its worker files. */}}
{{- define "sglb.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}
{{- define "sglb.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{- define "sglb.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
