{{- define "classify-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "classify-worker.fullname" -}}
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

{{- define "classify-worker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "classify-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "classify-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "classify-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "classify-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "classify-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Where the worker finds its bundle: /models/bundle when the chart mounts one (from an image or
a claim), else model.path (empty = the model shipped in the worker image). */}}
{{- define "classify-worker.modelPath" -}}
{{- if and .Values.model.image.repository .Values.model.existingClaim }}
{{- fail "set at most one of model.image.repository and model.existingClaim" }}
{{- end }}
{{- if or .Values.model.image.repository .Values.model.existingClaim -}}
/models/bundle
{{- else -}}
{{ .Values.model.path }}
{{- end }}
{{- end }}

{{- /* Where the TLS Secrets are mounted; the worker reads them through CW_KAFKA__CONFIG. */ -}}
{{- define "classify-worker.tlsDir" -}}/etc/classify-worker/kafka-tls{{- end }}

{{- /* kafka.config plus the file locations of the mounted TLS Secrets (these win: they are what is mounted). */ -}}
{{- define "classify-worker.kafkaConfig" -}}
{{- $config := deepCopy .Values.kafka.config }}
{{- $dir := include "classify-worker.tlsDir" . }}
{{- if .Values.kafka.tls.caSecret.name }}
{{- $_ := set $config "ssl.ca.location" (printf "%s/ca/ca.crt" $dir) }}
{{- end }}
{{- if .Values.kafka.tls.clientSecret.name }}
{{- $_ := set $config "ssl.certificate.location" (printf "%s/client/tls.crt" $dir) }}
{{- $_ := set $config "ssl.key.location" (printf "%s/client/tls.key" $dir) }}
{{- end }}
{{- toJson $config }}
{{- end }}

{{- /* The grace period: set, or sized from the timeouts a shutdown waits on (values.yaml says how). */ -}}
{{- define "classify-worker.terminationGracePeriodSeconds" -}}
{{- if ne (toString .Values.terminationGracePeriodSeconds) "" -}}
{{ .Values.terminationGracePeriodSeconds }}
{{- else -}}
{{- $commit := min (div (add .Values.kafka.transactionTimeoutMs 999) 1000) 60 -}}
{{- $leave := div (add .Values.kafka.sessionTimeoutMs 999) 1000 -}}
{{ add $commit $leave 20 }}
{{- end -}}
{{- end }}
