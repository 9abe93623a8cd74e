{{/* Names: <release>-matrixinfer-<component>, or <release>-<component> when the release name
already contains the chart name. */}}
{{- define "mi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mi.name" -}}
{{- printf "%s-%s" (include "mi.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mi.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mi.labels" -}}
{{ include "mi.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "mi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The restricted Pod Security Standard, for every container of the chart. */}}
{{- define "mi.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "mi.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}

{{- define "mi.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "mi.gatewayName" -}}
{{- default (printf "%s-gateway" (include "mi.fullname" .)) .Values.envoy.gatewayAPI.gatewayName -}}
{{- end -}}

{{- define "mi.chargeKeySecret" -}}
{{- default (printf "%s-charge-key" (include "mi.fullname" .)) .Values.extproc.policies.chargeKeySecret -}}
{{- end -}}

{{- define "mi.redisSecret" -}}
{{- default (printf "%s-redis" (include "mi.fullname" .)) .Values.redis.existingSecret -}}
{{- end -}}

{{/* "Role" in watchNamespace, or "ClusterRole" for every namespace. */}}
{{- define "mi.roleKind" -}}
{{- if .Values.watchNamespace -}}Role{{- else -}}ClusterRole{{- end -}}
{{- end -}}

{{/* The admission webhooks' Service (the controllers' pods) and its in-cluster DNS name. */}}
{{- define "mi.webhookService" -}}
{{- include "mi.name" (dict "root" . "component" "webhook") -}}
{{- end -}}

{{- define "mi.webhookHost" -}}
{{- printf "%s.%s.svc" (include "mi.webhookService" .) .Release.Namespace -}}
{{- end -}}

{{/* The Secret with the webhook server's tls.crt/tls.key (chart-made or cert-manager's); empty
when the operator makes its own self-signed certificate (configurations: operator, no
cert-manager). */}}
{{- define "mi.webhookSecret" -}}
{{- $w := .Values.controllers.webhooks -}}
{{- if or $w.certManager.enabled (eq $w.configurations "chart") -}}
{{- printf "%s-webhook-tls" (include "mi.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The operator's admission handlers (controllers/webhooks/handlers.py): id = URL path. */}}
{{- define "mi.webhooks" -}}
- {type: validating, id: validate-model, group: registry.matrixinfer.ai, plural: models}
- {type: validating, id: validate-autoscalingpolicy, group: registry.matrixinfer.ai, plural: autoscalingpolicies}
- {type: validating, id: validate-modelinfer, group: workload.matrixinfer.ai, plural: modelinfers}
- {type: validating, id: validate-modelserver, group: networking.matrixinfer.ai, plural: modelservers}
- {type: validating, id: validate-modelroute, group: networking.matrixinfer.ai, plural: modelroutes}
- {type: mutating, id: default-modelserver, group: networking.matrixinfer.ai, plural: modelservers}
{{- end -}}

{{/* The namespace whose Models the console lists and creates. */}}
{{- define "mi.consoleNamespace" -}}
{{- .Values.console.namespace | default .Values.watchNamespace | default .Release.Namespace -}}
{{- end -}}
