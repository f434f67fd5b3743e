# cc-proxy in a container: python3 proxy.py on a slim image, as a non-root user.
FROM python:3.12-slim
RUN useradd --create-home --uid 10001 ccproxy
WORKDIR /app
COPY proxy.py config.json LICENSE README.md /app/
RUN chown -R ccproxy:ccproxy /app
USER ccproxy
ENV HOST=0.0.0.0 PORT=3000 PYTHONUNBUFFERED=1
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
  CMD python3 -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT','3000'), timeout=4)"
CMD ["python3", "/app/proxy.py", "start"]
